// How fast one process can move host memory of another process of the host, by three means:
//   pvr     process_vm_readv from a child's buffer (what the same-host path does), T threads each
//           copying pieces of PIECE KiB;
//   shm     two copies through a ring both processes map: T threads of the child copy pieces into
//           ring slots, T threads of the parent copy them out (what a staging area the engines
//           share would do);
//   memcpy  both buffers in one process, T threads (the host's copy ceiling).
// THP 1 asks for transparent huge pages on both buffers (madvise), 0 forbids them: process_vm_readv
// pins the peer's pages one by one, and threads pinning neighbouring pages share page-table locks.
// Threads spin between copies, so with shm 2 x T + 1 must not exceed the CPUs.
//   gcc -O2 -pthread -o same_host_copy scripts/diag/same_host_copy.c
//   ./same_host_copy MODE SIZE_MIB THREADS PIECE_KIB ITERS THP
// prints the median and best time of ITERS copies of the whole buffer and their rates.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { PVR, SHM, MEMCPY };
#define MAX_THREADS 256
#define MAX_SLOTS 4096
#define HUGE (2ul << 20)

// Shared by parent and child (MAP_SHARED before fork).
struct shared {
    _Atomic long go;       // iteration the consumers (parent threads) may start
    _Atomic long done;     // consumer threads finished, over all iterations
    _Atomic long stop;
    _Atomic int ready;     // 1: the child's buffer is filled; 2: the parent is finished
    char *src;             // the child's buffer, in the child's address space
    _Atomic long filled[MAX_SLOTS];   // shm: the global piece number a slot holds
    _Atomic long drained[MAX_SLOTS];  // shm: the global piece number last copied out of a slot
};

static struct shared *sh;
static int mode, threads;
static size_t size, piece, pieces, slots;
static pid_t child;
static char *dst, *src, *ring;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static char *buffer(size_t len, int thp, int fill) {
    char *p = mmap(NULL, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    p = (char *)(((size_t)p + HUGE - 1) & ~(HUGE - 1));
    madvise(p, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(p, fill, len);
    return p;
}

static void wait_for(_Atomic long *v, long at_least) {
    while (atomic_load_explicit(v, memory_order_acquire) < at_least && !atomic_load(&sh->stop)) {}
}

static size_t piece_len(size_t i) { return size - i * piece < piece ? size - i * piece : piece; }

// A parent thread: copies its pieces (every `threads`-th) into dst, once per iteration.
static void *consumer(void *arg) {
    long t = (long)arg;
    for (long it = 1;; it++) {
        wait_for(&sh->go, it);
        if (atomic_load(&sh->stop)) return NULL;
        for (size_t i = t; i < pieces; i += threads) {
            size_t off = i * piece, len = piece_len(i);
            if (mode == PVR) {
                struct iovec local = {dst + off, len}, remote = {sh->src + off, len};
                if (process_vm_readv(child, &local, 1, &remote, 1, 0) != (ssize_t)len) {
                    perror("process_vm_readv");
                    atomic_store(&sh->stop, 1);
                    atomic_store(&sh->ready, 2);
                    exit(1);
                }
            } else if (mode == SHM) {
                long g = (it - 1) * (long)pieces + (long)i;
                size_t slot = g % slots;
                while (atomic_load_explicit(&sh->filled[slot], memory_order_acquire) != g && !atomic_load(&sh->stop)) {}
                memcpy(dst + off, ring + slot * piece, len);
                atomic_store_explicit(&sh->drained[slot], g, memory_order_release);
            } else {
                memcpy(dst + off, src + off, len);
            }
        }
        atomic_fetch_add(&sh->done, 1);
    }
}

// A child thread (shm): copies its pieces into ring slots as the slots drain.
static void *producer(void *arg) {
    long t = (long)arg;
    for (long it = 1;; it++) {
        wait_for(&sh->go, it);
        if (atomic_load(&sh->stop)) return NULL;
        for (size_t i = t; i < pieces; i += threads) {
            long g = (it - 1) * (long)pieces + (long)i;
            size_t slot = g % slots;
            while (atomic_load_explicit(&sh->drained[slot], memory_order_acquire) != g - (long)slots && !atomic_load(&sh->stop)) {}
            memcpy(ring + slot * piece, src + i * piece, piece_len(i));
            atomic_store_explicit(&sh->filled[slot], g, memory_order_release);
        }
    }
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s pvr|shm|memcpy SIZE_MIB THREADS PIECE_KIB ITERS THP\n", argv[0]);
        return 2;
    }
    mode = !strcmp(argv[1], "pvr") ? PVR : !strcmp(argv[1], "shm") ? SHM : !strcmp(argv[1], "memcpy") ? MEMCPY : -1;
    double mib = atof(argv[2]);
    int piece_kib = atoi(argv[4]);
    threads = atoi(argv[3]);
    int iters = atoi(argv[5]), thp = atoi(argv[6]);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    // A piece is at most the 64 MiB ring, so a ring always has a slot.
    if (mode < 0 || !(mib > 0 && mib <= 65536) || piece_kib < 1 || piece_kib > 65536 || threads < 1 ||
        threads > MAX_THREADS || iters < 1 || iters > 100000) {
        fprintf(stderr, "bad arguments: SIZE_MIB in (0, 65536], PIECE_KIB 1-65536, THREADS 1-%d, ITERS 1-100000\n",
                MAX_THREADS);
        return 2;
    }
    size = (size_t)(mib * (1 << 20));
    piece = (size_t)piece_kib << 10;
    if (mode == SHM && 2 * threads + 1 > cpus) {
        fprintf(stderr, "shm with %d threads per side spins on more than the %ld CPUs\n", threads, cpus);
        return 2;
    }
    pieces = (size + piece - 1) / piece;
    slots = (64ul << 20) / piece;
    if (slots > MAX_SLOTS) slots = MAX_SLOTS;
    if (slots > pieces) slots = pieces;
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t k = 0; k < MAX_SLOTS; k++) {
        sh->filled[k] = -1;
        sh->drained[k] = (long)k - (long)slots;  // every slot starts drained
    }
    if (mode == SHM) {
        ring = mmap(NULL, slots * piece, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (ring == MAP_FAILED) { perror("mmap ring"); return 1; }
    }
    child = fork();
    if (child == 0) {
        src = sh->src = buffer(size, thp, 0x5a);
        atomic_store(&sh->ready, 1);
        pthread_t th[MAX_THREADS];
        int producers = mode == SHM ? threads : 0;
        for (long t = 0; t < producers; t++) pthread_create(&th[t], NULL, producer, (void *)t);
        for (int t = 0; t < producers; t++) pthread_join(th[t], NULL);
        while (atomic_load(&sh->ready) != 2) usleep(1000);
        _exit(0);
    }
    while (atomic_load(&sh->ready) != 1) usleep(100);
    dst = buffer(size, thp, 0);
    if (mode == MEMCPY) src = buffer(size, thp, 0x5a);
    pthread_t th[MAX_THREADS];
    for (long t = 0; t < threads; t++) pthread_create(&th[t], NULL, consumer, (void *)t);
    double *took = calloc(iters, sizeof *took);
    for (int it = 1; it <= iters; it++) {
        double t0 = now();
        atomic_store_explicit(&sh->go, it, memory_order_release);
        wait_for(&sh->done, (long)it * threads);
        took[it - 1] = now() - t0;
    }
    atomic_store(&sh->stop, 1);
    for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
    atomic_store(&sh->ready, 2);
    waitpid(child, NULL, 0);
    for (size_t i = 0; i < size; i++) {
        if (dst[i] != 0x5a) { fprintf(stderr, "byte %zu was not copied\n", i); return 1; }
    }
    qsort(took, iters, sizeof *took, by_value);
    double med = took[iters / 2], best = took[0];
    printf("%-6s %8.2f MiB  threads %3d  piece %5zu KiB  thp %d: median %8.1f us %7.2f GB/s, best %7.2f GB/s\n",
           argv[1], size / 1048576.0, threads, piece >> 10, thp, med * 1e6, size / med / 1e9, size / best / 1e9);
    return 0;
}
