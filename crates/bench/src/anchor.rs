//! Same-host anchors: what the GPUs themselves do with the bytes a same-host transfer moves,
//! measured in the client process in the same run. Between two GPUs `cuMemcpyPeerAsync` (naming
//! both primary contexts, with peer access enabled where the GPUs allow it), on one GPU `cuMemcpyDtoDAsync`, each copy followed by
//! `cuStreamSynchronize`: one copy and one wait per transfer, as a transfer at depth 1 waits for
//! each. At 8 bytes that is the launch+sync time a same-host round trip is held against.

use std::time::{Duration, Instant};

use cudarc::driver::{result, sys};
use uccl_tcpx::internal::cuda::DeviceBuffer;

type Io<T> = std::io::Result<T>;

/// One anchor point: the mean and median time of one copy of the size, waited for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Anchor {
    pub avg: Duration,
    pub p50: Duration,
}

impl Anchor {
    pub fn gbs(&self, size: usize) -> f64 {
        size as f64 / self.avg.as_secs_f64().max(1e-12) / 1e9
    }
}

fn check(status: sys::CUresult, what: &str) -> Io<()> {
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(std::io::Error::other(format!("anchor: {what} failed: {other:?}"))),
    }
}

/// GPU `ordinal`'s primary context, retained for the life of the process (as the library keeps
/// its own reference).
fn primary_context(ordinal: i32) -> Io<sys::CUcontext> {
    let dev = result::device::get(ordinal).map_err(|e| std::io::Error::other(format!("cuDeviceGet: {e:?}")))?;
    // SAFETY: `dev` came from cuDeviceGet; the reference is never released.
    unsafe { result::primary_ctx::retain(dev) }
        .map_err(|e| std::io::Error::other(format!("cuDevicePrimaryCtxRetain: {e:?}")))
}

/// `iters` copies of `size` bytes from GPU `src_gpu` to GPU `dst_gpu` (after a short warm-up), each
/// waited for.
pub fn device_copy(src_gpu: i32, dst_gpu: i32, size: usize, iters: usize) -> Io<Anchor> {
    let io = |e: uccl_tcpx::Error| std::io::Error::other(e.to_string());
    let src = DeviceBuffer::new(src_gpu, size).map_err(io)?;
    let dst = DeviceBuffer::new(dst_gpu, size).map_err(io)?;
    let (src_ctx, dst_ctx) = (primary_context(src_gpu)?, primary_context(dst_gpu)?);
    // SAFETY: a retained primary context; this thread is the bench's own.
    unsafe { result::ctx::set_current(src_ctx) }.map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    if src_gpu != dst_gpu {
        // The anchor is what the GPUs' own link gives: without peer access the driver stages a
        // peer copy through host memory, while the same-host path's IPC mappings go over the link.
        // SAFETY: two retained primary contexts, the source's current on this thread.
        let status = unsafe { sys::cuCtxEnablePeerAccess(dst_ctx, 0) };
        match status {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
            other => {
                eprintln!("anchor: no peer access from GPU {src_gpu} to GPU {dst_gpu} ({other:?}): copies are staged")
            }
        }
    }
    let mut stream: sys::CUstream = std::ptr::null_mut();
    let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
    // SAFETY: one writable stream handle; the source GPU's context is current.
    let created = unsafe { sys::cuStreamCreate(&mut stream, flags) };
    check(created, "cuStreamCreate")?;
    let (s, d) = (src.addr() as sys::CUdeviceptr, dst.addr() as sys::CUdeviceptr);
    let copy_and_wait = || -> Io<()> {
        // SAFETY: both buffers hold `size` bytes and live until the stream is destroyed below.
        let status = unsafe {
            if src_gpu == dst_gpu {
                sys::cuMemcpyDtoDAsync_v2(d, s, size, stream)
            } else {
                sys::cuMemcpyPeerAsync(d, dst_ctx, s, src_ctx, size, stream)
            }
        };
        check(status, "copy")?;
        // SAFETY: a stream this function owns.
        check(unsafe { sys::cuStreamSynchronize(stream) }, "cuStreamSynchronize")
    };
    let measured = (|| -> Io<Vec<Duration>> {
        for _ in 0..(iters / 10).clamp(1, 10) {
            copy_and_wait()?;
        }
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            copy_and_wait()?;
            samples.push(t.elapsed());
        }
        Ok(samples)
    })();
    // SAFETY: every copy was waited for; the stream is destroyed once.
    unsafe { sys::cuStreamDestroy_v2(stream) };
    let mut samples: Vec<Duration> = measured?;
    let avg = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
    samples.sort_unstable();
    let p50 = samples.get(samples.len() / 2).copied().unwrap_or_default();
    Ok(Anchor { avg, p50 })
}

/// The server's GPU ordinal from its memory description (`gpuN@<bus id>`); `None` for host memory.
pub fn server_gpu(server_memory: &str) -> Option<i32> {
    server_memory.strip_prefix("gpu")?.split_once('@')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_gpu_comes_from_its_memory_description() {
        assert_eq!(server_gpu("gpu1@0000:5b:00.0"), Some(1));
        assert_eq!(server_gpu("gpu0@0"), Some(0));
        assert_eq!(server_gpu("host"), None);
        assert_eq!(server_gpu("gpux@0"), None);
    }

    #[test]
    fn anchor_bandwidth_is_bytes_over_the_mean() {
        let a = Anchor { avg: Duration::from_micros(100), p50: Duration::from_micros(90) };
        assert!((a.gbs(1 << 20) - (1 << 20) as f64 / 100e-6 / 1e9).abs() < 1e-9);
    }
}
