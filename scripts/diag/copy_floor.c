// What one device copy between two GPUs costs at the least, as the same-host GPU path issues and
// waits for it, with no engine around it: the floor under `uccl-tcpx-bench --same-host`.
//   HOW   peer  cuMemcpyPeerAsync from GPU 0 to GPU 1, issued in GPU 0's context (the bench's anchor)
//         push  cuMemcpyAsync in GPU 0's context from its memory to GPU 1's (a same-host write)
//         pull  cuMemcpyAsync in GPU 0's context from GPU 1's memory to its own (a same-host read)
//         same  cuMemcpyDtoDAsync within GPU 0 (one-GPU hosts)
//   push/pull with a suffix: "d" issues cuMemcpyDtoDAsync instead of cuMemcpyAsync; "ipc" takes GPU
//   1's memory from a child process through cuIpcOpenMemHandle, as a same-host peer's is mapped,
//   instead of this process's own allocation (ipcpush, ipcpull, ipcpushd, ipcpulld)
// For each size, five ways to learn the copy ended (p50 / p10 / p90 of the whole, and of the issue):
//   sync        cuStreamSynchronize
//   event       cuEventRecord, cuEventQuery until done (what the engine does)
//   flag        cuStreamWriteValue32 into mapped page-locked memory, read until it changes
//   event+ctx   as event, the context saved and set around each call (what `Gpu::enter` does)
//   splitK      the copy cut in K parts on K streams, an event each (K = 2, 3, 4)
// Loads libcuda at run time, so it builds without CUDA headers:
//   gcc -O2 -o copy_floor scripts/diag/copy_floor.c -ldl
//   ./copy_floor HOW [SIZES_KIB...]     (default 4 64 256 1024 4096)
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef unsigned long long CUdeviceptr;
#define FN(name, ...)                          \
  typedef CUresult (*name##_t)(__VA_ARGS__); \
  static name##_t name;
FN(cuInit, unsigned)
FN(cuDeviceGetCount, int *)
FN(cuDeviceGet, CUdevice *, int)
FN(cuDevicePrimaryCtxRetain, CUcontext *, CUdevice)
FN(cuCtxSetCurrent, CUcontext)
FN(cuCtxGetCurrent, CUcontext *)
FN(cuCtxEnablePeerAccess, CUcontext, unsigned)
FN(cuMemAlloc_v2, CUdeviceptr *, size_t)
FN(cuMemHostAlloc, void **, size_t, unsigned)
FN(cuMemHostGetDevicePointer_v2, CUdeviceptr *, void *, unsigned)
FN(cuStreamCreate, CUstream *, unsigned)
FN(cuStreamSynchronize, CUstream)
FN(cuStreamWriteValue32_v2, CUstream, CUdeviceptr, uint32_t, unsigned)
FN(cuEventCreate, CUevent *, unsigned)
FN(cuEventRecord, CUevent, CUstream)
FN(cuEventQuery, CUevent)
FN(cuMemcpyAsync, CUdeviceptr, CUdeviceptr, size_t, CUstream)
FN(cuMemcpyDtoDAsync_v2, CUdeviceptr, CUdeviceptr, size_t, CUstream)
FN(cuMemcpyPeerAsync, CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, size_t, CUstream)
typedef struct { char bytes[64]; } CUipcMemHandle;
FN(cuIpcGetMemHandle, CUipcMemHandle *, CUdeviceptr)
FN(cuIpcOpenMemHandle_v2, CUdeviceptr *, CUipcMemHandle, unsigned)

#define CHECK(x)                                     \
  do {                                               \
    CUresult r_ = (x);                               \
    if (r_) {                                        \
      fprintf(stderr, "%s failed: %d\n", #x, r_);    \
      exit(1);                                       \
    }                                                \
  } while (0)
#define NOT_READY 600
#define ITERS 3000
#define WARMUP 200
#define MAX_BYTES (64ul << 20)

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

enum how { PEER, PUSH, PULL, SAME };
static enum how how;
static int dtod;
static CUcontext c0, c1;
static CUdeviceptr here, there;  // GPU 0's buffer, GPU 1's (GPU 0's again for SAME)

static void copy(size_t off, size_t len, CUstream s) {
  switch (how) {
  case PEER: CHECK(cuMemcpyPeerAsync(there + off, c1, here + off, c0, len, s)); break;
  case PUSH:
    if (dtod) CHECK(cuMemcpyDtoDAsync_v2(there + off, here + off, len, s));
    else CHECK(cuMemcpyAsync(there + off, here + off, len, s));
    break;
  case PULL:
    if (dtod) CHECK(cuMemcpyDtoDAsync_v2(here + off, there + off, len, s));
    else CHECK(cuMemcpyAsync(here + off, there + off, len, s));
    break;
  case SAME: CHECK(cuMemcpyDtoDAsync_v2(there + off, here + off, len, s)); break;
  }
}

static void wait_event(CUevent e) {
  CUresult r;
  while ((r = cuEventQuery(e)) == NOT_READY) {
  }
  CHECK(r);
}

int main(int argc, char **argv) {
  const char *names[] = {"peer", "push", "pull", "same"};
  if (argc < 2) {
    fprintf(stderr, "usage: %s peer|[ipc]push[d]|[ipc]pull[d]|same [SIZES_KIB...]\n", argv[0]);
    return 2;
  }
  char base[16];
  int ipc = strncmp(argv[1], "ipc", 3) == 0;
  snprintf(base, sizeof base, "%s", argv[1] + (ipc ? 3 : 0));
  size_t blen = strlen(base);
  if (blen == 5 && base[4] == 'd') {
    dtod = 1;
    base[4] = 0;
  }
  for (how = PEER; how <= SAME && strcmp(base, names[how]); how++) {
  }
  if ((ipc || dtod) && how != PUSH && how != PULL) how = SAME + 1;
  if (how > SAME) {
    fprintf(stderr, "unknown HOW %s\n", argv[1]);
    return 2;
  }
  // The owner of GPU 1's memory under "ipc": a child that exports it and lives until told to go.
  int to_parent[2], to_child[2];
  pid_t child = -1;
  if (ipc) {
    if (pipe(to_parent) || pipe(to_child)) return 1;
    child = fork();
    if (child < 0) return 1;
    // Each side keeps its own ends, so a child that fails ends the parent's read.
    close(child ? to_parent[1] : to_parent[0]);
    close(child ? to_child[0] : to_child[1]);
  }
  void *lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) {
    fprintf(stderr, "no libcuda.so.1\n");
    return 1;
  }
#define LOAD(name)                                   \
  if (!(name = (name##_t)dlsym(lib, #name))) {       \
    fprintf(stderr, "libcuda lacks %s\n", #name);    \
    return 1;                                        \
  }
  LOAD(cuInit) LOAD(cuDeviceGetCount) LOAD(cuDeviceGet) LOAD(cuDevicePrimaryCtxRetain) LOAD(cuCtxSetCurrent)
  LOAD(cuCtxGetCurrent) LOAD(cuCtxEnablePeerAccess) LOAD(cuMemAlloc_v2) LOAD(cuMemHostAlloc)
  LOAD(cuMemHostGetDevicePointer_v2) LOAD(cuStreamCreate) LOAD(cuStreamSynchronize) LOAD(cuStreamWriteValue32_v2)
  LOAD(cuEventCreate) LOAD(cuEventRecord) LOAD(cuEventQuery) LOAD(cuMemcpyAsync) LOAD(cuMemcpyDtoDAsync_v2)
  LOAD(cuMemcpyPeerAsync) LOAD(cuIpcGetMemHandle) LOAD(cuIpcOpenMemHandle_v2)
  CHECK(cuInit(0));
  if (ipc && child == 0) {
    CUdevice d;
    CUcontext c;
    CUdeviceptr mem;
    CUipcMemHandle h;
    char gone;
    CHECK(cuDeviceGet(&d, 1));
    CHECK(cuDevicePrimaryCtxRetain(&c, d));
    CHECK(cuCtxSetCurrent(c));
    CHECK(cuMemAlloc_v2(&mem, MAX_BYTES));
    CHECK(cuIpcGetMemHandle(&h, mem));
    if (write(to_parent[1], &h, sizeof h) != sizeof h) return 1;
    if (read(to_child[0], &gone, 1) < 0) return 1;
    return 0;
  }
  int gpus = 0;
  CHECK(cuDeviceGetCount(&gpus));
  if (how != SAME && gpus < 2) {
    fprintf(stderr, "%s needs two GPUs (this host has %d): use same\n", names[how], gpus);
    return 1;
  }
  CUdevice d0, d1;
  CHECK(cuDeviceGet(&d0, 0));
  CHECK(cuDeviceGet(&d1, how == SAME ? 0 : 1));
  CHECK(cuDevicePrimaryCtxRetain(&c0, d0));
  CHECK(cuDevicePrimaryCtxRetain(&c1, d1));
  if (ipc) {
    CUipcMemHandle h;
    if (read(to_parent[0], &h, sizeof h) != sizeof h) {
      fprintf(stderr, "the child exported nothing\n");
      return 1;
    }
    CHECK(cuCtxSetCurrent(c0));
    CHECK(cuIpcOpenMemHandle_v2(&there, h, 1 /* lazy peer access */));
  } else {
    CHECK(cuCtxSetCurrent(c1));
    CHECK(cuMemAlloc_v2(&there, MAX_BYTES));
    CHECK(cuCtxSetCurrent(c0));
    if (how != SAME) CHECK(cuCtxEnablePeerAccess(c1, 0));
  }
  CHECK(cuMemAlloc_v2(&here, MAX_BYTES));
  CUstream streams[4];
  CUevent events[4];
  for (int k = 0; k < 4; k++) {
    CHECK(cuStreamCreate(&streams[k], 1 /* non-blocking */));
    CHECK(cuEventCreate(&events[k], 2 /* timing disabled */));
  }
  volatile uint32_t *flag;
  CUdeviceptr flag_dev;
  CHECK(cuMemHostAlloc((void **)&flag, 64, 0x1 | 0x2 /* portable, mapped */));
  *flag = 0;
  CHECK(cuMemHostGetDevicePointer_v2(&flag_dev, (void *)flag, 0));

  size_t sizes[32] = {4, 64, 256, 1024, 4096};
  int nsizes = 5;
  if (argc > 2) {
    nsizes = 0;
    for (int i = 2; i < argc && nsizes < 32; i++) sizes[nsizes++] = strtoul(argv[i], NULL, 10);
  }
  const char *ways[] = {"sync", "event", "flag", "event+ctx", "split2", "split3", "split4"};
  double *total = malloc(ITERS * sizeof(double)), *issue = malloc(ITERS * sizeof(double));
  uint32_t value = 0;
  printf("%s, %d GPUs\n", argv[1], gpus);
  for (int si = 0; si < nsizes; si++) {
    size_t bytes = sizes[si] << 10;
    if (bytes == 0 || bytes > MAX_BYTES) {
      fprintf(stderr, "sizes are 1 KiB to %lu KiB\n", MAX_BYTES >> 10);
      return 2;
    }
    for (int way = 0; way < 7; way++) {
      int parts = way >= 4 ? way - 2 : 1;
      for (int i = -WARMUP; i < ITERS; i++) {
        CUcontext saved = NULL;
        double t0 = now_us();
        if (way == 3) {
          CHECK(cuCtxGetCurrent(&saved));
          CHECK(cuCtxSetCurrent(c0));
        }
        size_t part = bytes / parts;
        for (int k = 0; k < parts; k++) copy(k * part, k == parts - 1 ? bytes - k * part : part, streams[k]);
        if (way == 1 || way == 3 || way >= 4)
          for (int k = 0; k < parts; k++) CHECK(cuEventRecord(events[k], streams[k]));
        if (way == 2) CHECK(cuStreamWriteValue32_v2(streams[0], flag_dev, ++value, 0));
        if (way == 3) CHECK(cuCtxSetCurrent(saved));
        double t1 = now_us();
        if (way == 0) CHECK(cuStreamSynchronize(streams[0]));
        if (way == 2)
          while (*flag != value) {
          }
        if (way == 1 || way >= 4)
          for (int k = 0; k < parts; k++) wait_event(events[k]);
        if (way == 3) {
          for (;;) {
            CHECK(cuCtxGetCurrent(&saved));
            CHECK(cuCtxSetCurrent(c0));
            CUresult r = cuEventQuery(events[0]);
            CHECK(cuCtxSetCurrent(saved));
            if (r != NOT_READY) {
              CHECK(r);
              break;
            }
          }
        }
        double t2 = now_us();
        if (i >= 0) {
          total[i] = t2 - t0;
          issue[i] = t1 - t0;
        }
      }
      qsort(total, ITERS, sizeof(double), by_value);
      qsort(issue, ITERS, sizeof(double), by_value);
      printf("%8zu KiB %-10s p50 %7.2f us  p10 %7.2f  p90 %7.2f  issue p50 %5.2f\n", sizes[si], ways[way],
             total[ITERS / 2], total[ITERS / 10], total[ITERS * 9 / 10], issue[ITERS / 2]);
    }
  }
  if (ipc) {
    close(to_child[1]);
    waitpid(child, NULL, 0);
  }
  return 0;
}
