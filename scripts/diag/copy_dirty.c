// What a copy between pinned host memory and a GPU pays for bytes CPU threads just touched: a
// host-to-device copy of bytes the threads wrote (memset, or recv() from sockets, as the staged
// path's receiving helpers do), a device-to-host copy into bytes they read (send() from it, as the
// sending helpers do), each with and without the threads writing their part back (clwb) or evicting
// it (clflushopt) first. The CUDA driver is loaded at run time: no CUDA headers needed.
//   gcc -O2 -mclwb -mclflushopt -o copy_dirty scripts/diag/copy_dirty.c -ldl -lpthread
//   ./copy_dirty [GPU]     (x86_64 with clwb and clflushopt; one line per case, medians of 50)
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef void *CUctx, *CUstream, *CUevent;
typedef unsigned long long CUdptr;
static CUresult (*cuInit)(unsigned), (*cuDeviceGet)(int *, int), (*cuDevicePrimaryCtxRetain)(CUctx *, int),
    (*cuCtxSetCurrent)(CUctx), (*cuMemHostAlloc)(void **, size_t, unsigned), (*cuMemAlloc)(CUdptr *, size_t),
    (*cuStreamCreate)(CUstream *, unsigned), (*cuEventCreate)(CUevent *, unsigned), (*cuEventRecord)(CUevent, CUstream),
    (*cuEventSynchronize)(CUevent), (*cuEventElapsedTime)(float *, CUevent, CUevent),
    (*cuMemcpyHtoDAsync)(CUdptr, const void *, size_t, CUstream), (*cuMemcpyDtoHAsync)(void *, CUdptr, size_t, CUstream);
#define LOAD(f, n) do { *(void **)&f = dlsym(lib, n); if (!f) { fprintf(stderr, "no %s\n", n); exit(1); } } while (0)
#define CK(x) do { CUresult r_ = (x); if (r_) { fprintf(stderr, "%s: error %d\n", #x, r_); exit(1); } } while (0)

enum touch { MEMSET, RECV, READ, SEND };
enum after { NOTHING, CLWB, CLFLUSHOPT };
static const char *touch_name[] = {"memset", "recv()", "read", "send()"};
static const char *after_name[] = {"", " + clwb", " + clflushopt"};

static char *host;
static size_t len;
static int threads;
static enum touch touch;
static enum after after;
static int socks[16][2];
static volatile unsigned long sink;

static void lines_back(char *p, size_t n) {
    for (size_t i = 0; i < n; i += 64) {
        if (after == CLWB) _mm_clwb(p + i); else _mm_clflushopt(p + i);
    }
    _mm_sfence();
}

// The other end of a thread's socket pair: feeds a recv(), drains a send().
static void *peer(void *arg) {
    int k = *(int *)arg;
    size_t each = len / threads, done = 0;
    static char buf[16][8 << 20];
    while (done < each) {
        ssize_t n = touch == RECV ? send(socks[k][0], buf[k] + done, each - done, 0)
                                  : recv(socks[k][1], buf[k] + done, each - done, 0);
        if (n <= 0) { perror("peer"); exit(1); }
        done += n;
    }
    return NULL;
}

static void *toucher(void *arg) {
    int k = *(int *)arg;
    size_t each = len / threads, done = 0;
    char *p = host + k * each;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(1 + k, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    switch (touch) {
    case MEMSET: memset(p, k + 1, each); break;
    case READ: { unsigned long s = 0; for (size_t i = 0; i < each; i += 8) s += *(unsigned long *)(p + i); sink = s; break; }
    case RECV: case SEND:
        while (done < each) {
            ssize_t n = touch == RECV ? recv(socks[k][1], p + done, each - done, 0) : send(socks[k][0], p + done, each - done, 0);
            if (n <= 0) { perror("toucher"); exit(1); }
            done += n;
        }
    }
    if (after != NOTHING) lines_back(p, each);
    return NULL;
}

static int cmp(const void *a, const void *b) { float x = *(const float *)a, y = *(const float *)b; return (x > y) - (x < y); }

static void measure(CUstream s, CUevent a, CUevent b, CUdptr dev, int h2d) {
    float us[60];
    for (int it = 0; it < 60; it++) {
        pthread_t t[16], p[16];
        int ks[16];
        int paired = touch == RECV || touch == SEND;
        for (int k = 0; k < threads; k++) {
            ks[k] = k;
            pthread_create(&t[k], NULL, toucher, &ks[k]);
            if (paired) pthread_create(&p[k], NULL, peer, &ks[k]);
        }
        for (int k = 0; k < threads; k++) { pthread_join(t[k], NULL); if (paired) pthread_join(p[k], NULL); }
        CK(cuEventRecord(a, s));
        if (h2d) CK(cuMemcpyHtoDAsync(dev, host, len, s)); else CK(cuMemcpyDtoHAsync(host, dev, len, s));
        CK(cuEventRecord(b, s));
        CK(cuEventSynchronize(b));
        float ms;
        CK(cuEventElapsedTime(&ms, a, b));
        us[it] = ms * 1000;
    }
    qsort(us + 10, 50, sizeof us[0], cmp);
    char what[64];
    if (threads == 0) snprintf(what, sizeof what, "untouched");
    else snprintf(what, sizeof what, "%s%s by %d thread(s)", touch_name[touch], after_name[after], threads);
    printf("%s %5zu KiB after %-34s %7.1f us %5.1f GB/s\n", h2d ? "H2D" : "D2H", len >> 10, what, us[35], len / us[35] / 1e3);
}

int main(int argc, char **argv) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    LOAD(cuInit, "cuInit"); LOAD(cuDeviceGet, "cuDeviceGet"); LOAD(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    LOAD(cuCtxSetCurrent, "cuCtxSetCurrent"); LOAD(cuMemHostAlloc, "cuMemHostAlloc"); LOAD(cuMemAlloc, "cuMemAlloc_v2");
    LOAD(cuStreamCreate, "cuStreamCreate"); LOAD(cuEventCreate, "cuEventCreate"); LOAD(cuEventRecord, "cuEventRecord");
    LOAD(cuEventSynchronize, "cuEventSynchronize"); LOAD(cuEventElapsedTime, "cuEventElapsedTime");
    LOAD(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"); LOAD(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2");
    int ordinal = argc > 1 ? atoi(argv[1]) : 0, d;
    CUctx ctx; CUstream s; CUevent a, b;
    CK(cuInit(0)); CK(cuDeviceGet(&d, ordinal)); CK(cuDevicePrimaryCtxRetain(&ctx, d)); CK(cuCtxSetCurrent(ctx));
    CK(cuStreamCreate(&s, 1)); CK(cuEventCreate(&a, 0)); CK(cuEventCreate(&b, 0));
    for (int k = 0; k < 16; k++) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, socks[k])) { perror("socketpair"); return 1; }
        int sz = 8 << 20;
        setsockopt(socks[k][0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
        setsockopt(socks[k][1], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    size_t sizes[] = {512 << 10, 2 << 20, 8 << 20};
    for (int i = 0; i < 3; i++) {
        len = sizes[i];
        CUdptr dev;
        CK(cuMemHostAlloc((void **)&host, len, 1));
        CK(cuMemAlloc(&dev, len));
        memset(host, 1, len);
        threads = 0;
        measure(s, a, b, dev, 1);
        int counts[] = {1, 8, 16};
        for (int c = 0; c < 3; c++)
            for (touch = MEMSET; touch <= RECV; touch++)
                for (after = NOTHING; after <= CLFLUSHOPT; after++) { threads = counts[c]; measure(s, a, b, dev, 1); }
        threads = 0;
        measure(s, a, b, dev, 0);
        for (int c = 0; c < 3; c++)
            for (touch = READ; touch <= SEND; touch++)
                for (after = NOTHING; after <= CLFLUSHOPT; after += 2) { threads = counts[c]; measure(s, a, b, dev, 0); }
    }
    return 0;
}
