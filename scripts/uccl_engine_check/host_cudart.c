/*
 * A host-only stand-in for the CUDA runtime calls UCCL's p2p engine makes outside its GPU paths,
 * for running the engine's host-memory tests on a machine without a GPU or driver
 * (scripts/uccl_engine_check.sh builds it as libcudart.so.12 and puts it first on the library
 * path only when no GPU is found, and says so). Devices are numbered 0..UCCL_CHECK_HOST_GPUS-1
 * (default 2, as UCCL's tests use GPUs 0 and 1); streams are plain tokens and stream copies are
 * host copies done at once. Every GPU-only call (IPC handles) fails with cudaErrorNotSupported,
 * so a test that needs a GPU fails loudly rather than passing on host memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
  kSuccess = 0,
  kInvalidValue = 1,
  kInvalidDevice = 101,
  kNotSupported = 801,
};

typedef struct {
  char reserved[64];
} ipc_handle_t;

static int device_count(void) {
  const char *v = getenv("UCCL_CHECK_HOST_GPUS");
  int n = v != NULL ? atoi(v) : 2;
  return n > 0 && n <= 64 ? n : 2;
}

static __thread int current_device;

int cudaGetDeviceCount(int *count) {
  if (count == NULL) return kInvalidValue;
  *count = device_count();
  return kSuccess;
}

int cudaSetDevice(int device) {
  if (device < 0 || device >= device_count()) return kInvalidDevice;
  current_device = device;
  return kSuccess;
}

int cudaGetDevice(int *device) {
  if (device == NULL) return kInvalidValue;
  *device = current_device;
  return kSuccess;
}

int cudaStreamCreateWithFlags(void **stream, unsigned int flags) {
  (void)flags;
  if (stream == NULL) return kInvalidValue;
  *stream = malloc(1);
  return *stream != NULL ? kSuccess : kInvalidValue;
}

int cudaStreamCreate(void **stream) { return cudaStreamCreateWithFlags(stream, 0); }

int cudaStreamDestroy(void *stream) {
  free(stream);
  return kSuccess;
}

int cudaStreamSynchronize(void *stream) {
  (void)stream;
  return kSuccess;
}

int cudaDeviceSynchronize(void) { return kSuccess; }

int cudaMemcpyAsync(void *dst, const void *src, size_t count, int kind, void *stream) {
  (void)kind;
  (void)stream;
  if (count != 0 && (dst == NULL || src == NULL)) return kInvalidValue;
  memmove(dst, src, count);
  return kSuccess;
}

int cudaMemcpy(void *dst, const void *src, size_t count, int kind) {
  return cudaMemcpyAsync(dst, src, count, kind, NULL);
}

int cudaIpcGetMemHandle(ipc_handle_t *handle, void *ptr) {
  (void)handle;
  (void)ptr;
  return kNotSupported;
}

int cudaIpcOpenMemHandle(void **ptr, ipc_handle_t handle, unsigned int flags) {
  (void)ptr;
  (void)handle;
  (void)flags;
  return kNotSupported;
}

int cudaIpcCloseMemHandle(void *ptr) {
  (void)ptr;
  return kNotSupported;
}

int cudaGetLastError(void) { return kSuccess; }

int cudaPeekAtLastError(void) { return kSuccess; }

const char *cudaGetErrorString(int error) {
  switch (error) {
    case kSuccess: return "no error (host-only CUDA runtime stand-in)";
    case kInvalidValue: return "invalid argument (host-only CUDA runtime stand-in)";
    case kInvalidDevice: return "invalid device ordinal (host-only CUDA runtime stand-in)";
    case kNotSupported: return "operation not supported: no GPU (host-only CUDA runtime stand-in)";
    default: return "unknown error (host-only CUDA runtime stand-in)";
  }
}

const char *cudaGetErrorName(int error) {
  return error == kSuccess ? "cudaSuccess" : "cudaErrorNotSupported";
}
