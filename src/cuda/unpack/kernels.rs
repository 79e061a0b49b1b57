//! The unpack kernel, compiled by NVRTC for the device's own architecture on first use and kept for
//! the life of the process (one module per device), plus the raw launches the unpacker and the
//! benchmark share.

use std::ffi::{CString, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, result, sys};
use cudarc::nvrtc;

use super::memory::driver_error;
use super::plan::Tile;
use crate::error::{Error, Result};
use crate::threads::panic_text;

const SOURCE: &str = include_str!("kernel.cu");

/// Threads per block: four warps, four tiles. Small blocks spread a few tiles over many SMs.
pub const BLOCK_THREADS: u32 = 128;
const TILES_PER_BLOCK: u32 = BLOCK_THREADS / 32;

/// Tile capacities of the inline variants, smallest first. The driver copies a variant's whole
/// parameter block at every launch, so the tiny one (one 512 KiB receive of whole pages) keeps
/// that copy at 2 KiB. Tiny and small fit the 4 KiB parameter limit of every driver; the others
/// need CUDA 12.1+, which allows 32 764 bytes.
pub const INLINE_TINY: usize = 128;
pub const INLINE_SMALL: usize = 254;
pub const INLINE_MEDIUM: usize = 1024;
pub const INLINE_LARGE: usize = 2045;
const LARGE_PARAMS_DRIVER: i32 = 12010;

/// How a launch reports that it finished (`struct CompletionSignal` in kernel.cu): its last block
/// stores `seq` to the mapped host word at device address `word` after a system-scope fence,
/// counting finished blocks in the device `u32` at `counter` (0 before the launch, reset to 0 by
/// the kernel). `word == 0` signals nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionSignal {
    pub seq: u64,
    pub counter: u64,
    pub word: u64,
}

/// Kernel parameters of the inline variants: a count, the completion signal and the tiles. Every
/// variant's parameter block is a prefix of this one, so one buffer serves all of them.
#[repr(C)]
pub struct InlineTiles {
    pub count: u32,
    pub reserved: u32,
    pub signal: CompletionSignal,
    pub tiles: [Tile; INLINE_LARGE],
}

const INLINE_HEADER: usize = 32;
const _: () = assert!(std::mem::offset_of!(InlineTiles, tiles) == INLINE_HEADER);
const _: () = assert!(size_of::<InlineTiles>() == INLINE_HEADER + 16 * INLINE_LARGE);
const _: () = assert!(size_of::<InlineTiles>() <= 32764 && INLINE_HEADER + 16 * INLINE_SMALL <= 4096);

impl InlineTiles {
    pub fn boxed() -> Box<InlineTiles> {
        Box::new(InlineTiles {
            count: 0,
            reserved: 0,
            signal: CompletionSignal::default(),
            tiles: [Tile::default(); INLINE_LARGE],
        })
    }
}

const MAX_DEVICES: usize = 64;
/// Per device: the build's outcome.
static BUILT: [OnceLock<std::result::Result<Arc<UnpackKernels>, String>>; MAX_DEVICES] =
    [const { OnceLock::new() }; MAX_DEVICES];

/// Device `ordinal` exists here, and a build's outcome has a place for it.
fn check_ordinal(ordinal: usize) -> Result<()> {
    crate::cuda::driver()?;
    let count = result::device::get_count().map_err(|e| driver_error("count devices", e))?;
    if ordinal >= count as usize || ordinal >= MAX_DEVICES {
        return Err(Error::invalid(format!("unpack: no CUDA device {ordinal} ({count} present)")));
    }
    Ok(())
}

/// The compiled module of one device.
pub struct UnpackKernels {
    context: Arc<CudaContext>,
    target: String,
    device_tiles: CudaFunction,
    pieces: CudaFunction,
    inline: Vec<(usize, CudaFunction)>,
    _module: Arc<CudaModule>,
}

impl std::fmt::Debug for UnpackKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnpackKernels")
            .field("ordinal", &self.context.ordinal())
            .field("target", &self.target)
            .field("max_inline", &self.max_inline())
            .finish()
    }
}

impl UnpackKernels {
    /// The kernels of device `ordinal` (its primary context), compiled on the first call, which
    /// waits for NVRTC (a few hundred milliseconds) or for a build under way on another thread.
    /// The build makes the device's primary context current on the calling thread: callers that
    /// must leave the thread's context alone enter the GPU around it.
    pub fn for_device(ordinal: usize) -> Result<Arc<UnpackKernels>> {
        if let Some(built) = BUILT.get(ordinal).and_then(OnceLock::get) {
            return built.clone().map_err(Error::backend);
        }
        check_ordinal(ordinal)?;
        BUILT[ordinal]
            .get_or_init(|| match catch_unwind(AssertUnwindSafe(|| build(ordinal))) {
                Ok(built) => built.map(Arc::new).map_err(|e| e.message().to_owned()),
                Err(panic) => Err(format!("unpack: building the kernel panicked: {}", panic_text(&*panic))),
            })
            .clone()
            .map_err(Error::backend)
    }

    /// The kernels of device `ordinal` if their build ended (built, or failed), `None` while
    /// none did; never waits and never builds. For paths under a lock that other threads wait on
    /// (a connection's), which cannot wait for NVRTC: the engine builds the kernels when it
    /// registers the GPU's memory, outside every lock, and these paths move bytes another way
    /// until then.
    pub fn if_built(ordinal: usize) -> Option<Result<Arc<UnpackKernels>>> {
        BUILT.get(ordinal)?.get().map(|built| built.clone().map_err(Error::backend))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// What NVRTC compiled for, e.g. `sm_90` (a cubin) or `compute_90` (PTX the driver finishes).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Most tiles one launch can carry in its parameters.
    pub fn max_inline(&self) -> usize {
        self.inline.last().map_or(0, |(cap, _)| *cap)
    }

    /// Copies `count` tiles that sit in device memory at `tiles`, then raises `signal` (if its
    /// word is set).
    ///
    /// # Safety
    /// `stream` is a live stream of this device's primary context, current on this thread; `tiles`
    /// holds `count` tiles until the launch finished; every tile's ranges are valid device memory;
    /// a set signal names a zeroed device counter and a mapped host word no other launch running at
    /// the same time uses.
    pub unsafe fn launch_device_tiles(
        &self,
        stream: sys::CUstream,
        tiles: sys::CUdeviceptr,
        count: u32,
        signal: CompletionSignal,
    ) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let mut tiles = tiles;
        let mut count_arg = count;
        let mut signal = signal;
        let mut args: [*mut c_void; 3] =
            [(&raw mut tiles).cast(), (&raw mut count_arg).cast(), (&raw mut signal).cast()];
        // SAFETY: argument types match `unpack_tiles(const Tile*, u32, CompletionSignal)`; the rest
        // is the caller's.
        unsafe { self.launch(&self.device_tiles, stream, count, &mut args) }
    }

    /// Copies the first `params.count` tiles of `params` and raises `params.signal` (if set); the
    /// driver copies the parameters at the call, so `params` may be reused at once.
    ///
    /// # Safety
    /// As for [`launch_device_tiles`](Self::launch_device_tiles).
    pub unsafe fn launch_inline(&self, stream: sys::CUstream, params: &InlineTiles) -> Result<()> {
        let count = params.count;
        if count == 0 {
            return Ok(());
        }
        let Some((_, function)) = self.inline.iter().find(|(cap, _)| count as usize <= *cap) else {
            return Err(Error::invalid(format!(
                "unpack: {count} tiles do not fit in the parameters (at most {})",
                self.max_inline()
            )));
        };
        let mut args: [*mut c_void; 1] = [(params as *const InlineTiles).cast_mut().cast()];
        // SAFETY: the variant's parameter block is a prefix of InlineTiles; the driver only reads it.
        unsafe { self.launch(function, stream, count, &mut args) }
    }

    /// Copies the `count` pieces (`struct Piece` in kernel.cu: source, destination, length) that
    /// sit at device address `pieces`, one warp per piece.
    ///
    /// # Safety
    /// `stream` is a live stream of this device's primary context, current on this thread;
    /// `pieces` holds `count` pieces until the launch finished; every piece's ranges are valid
    /// device memory of this device's kernels, below 2^52.
    pub unsafe fn launch_pieces(&self, stream: sys::CUstream, pieces: sys::CUdeviceptr, count: u32) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let (mut pieces, mut count_arg) = (pieces, count);
        let mut args: [*mut c_void; 2] = [(&raw mut pieces).cast(), (&raw mut count_arg).cast()];
        // SAFETY: argument types match `copy_pieces(const Piece*, u32)`; the rest is the caller's.
        unsafe {
            result::launch_kernel(
                self.pieces.cu_function(),
                (count.div_ceil(TILES_PER_BLOCK), 1, 1),
                (BLOCK_THREADS, 1, 1),
                0,
                stream,
                &mut args,
            )
        }
        .map_err(|e| driver_error("launch piece copy kernel", e))
    }

    unsafe fn launch(
        &self,
        function: &CudaFunction,
        stream: sys::CUstream,
        tiles: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let grid = tiles.div_ceil(TILES_PER_BLOCK);
        // SAFETY: forwarded from the callers' contracts.
        unsafe { result::launch_kernel(function.cu_function(), (grid, 1, 1), (BLOCK_THREADS, 1, 1), 0, stream, args) }
            .map_err(|e| driver_error("launch unpack kernel", e))
    }
}

fn build(ordinal: usize) -> Result<UnpackKernels> {
    let context = CudaContext::new(ordinal).map_err(|e| driver_error("open primary context", e))?;
    let (major, minor) = context.compute_capability().map_err(|e| driver_error("query compute capability", e))?;
    if major < 7 {
        return Err(Error::backend(format!(
            "unpack: device {ordinal} has compute capability {major}.{minor}; the kernel needs 7.0 or newer"
        )));
    }
    let mut driver_version = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| driver_error("query driver version", e))?;
    let large_params = driver_version >= LARGE_PARAMS_DRIVER;
    let inline_caps = if large_params {
        [INLINE_TINY, INLINE_SMALL, INLINE_MEDIUM, INLINE_LARGE]
    } else {
        [INLINE_TINY, INLINE_SMALL, 0, 0]
    };

    let (target, image) = compile(major * 10 + minor, &inline_caps)?;
    let module = context.load_module(image).map_err(|e| driver_error(&format!("load module ({target})"), e))?;
    let load = |name: &str| module.load_function(name).map_err(|e| driver_error(&format!("find {name}"), e));
    let device_tiles = load("unpack_tiles")?;
    let pieces = load("copy_pieces")?;
    let mut inline = Vec::new();
    let names = ["unpack_inline_tiny", "unpack_inline_small", "unpack_inline_medium", "unpack_inline_large"];
    for (cap, name) in inline_caps.iter().zip(names) {
        if *cap > 0 {
            inline.push((*cap, load(name)?));
        }
    }
    Ok(UnpackKernels { context, target, device_tiles, pieces, inline, _module: module })
}

/// Compiles the kernel to a cubin for `sm_<cc>` when this NVRTC knows the architecture, else to PTX
/// for the newest architecture it knows below it.
fn compile(cc: i32, inline_caps: &[usize; 4]) -> Result<(String, nvrtc::Ptx)> {
    // SAFETY: only dlopens candidate library names.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(Error::backend(
            "unpack: NVRTC (libnvrtc.so) not found; it compiles the unpack kernel at run time (set LD_LIBRARY_PATH)",
        ));
    }
    let archs = supported_archs()?;
    let (target, cubin) = if archs.contains(&cc) {
        (format!("sm_{cc}"), true)
    } else {
        match archs.iter().copied().filter(|a| *a < cc).max() {
            Some(older) => (format!("compute_{older}"), false),
            None => {
                return Err(Error::backend(format!(
                    "unpack: this NVRTC supports architectures {archs:?}, none usable for compute capability {cc}"
                )));
            }
        }
    };
    let options = vec![
        format!("--gpu-architecture={target}"),
        "-std=c++17".to_owned(),
        format!("-DUNPACK_INLINE_TINY={}", inline_caps[0]),
        format!("-DUNPACK_INLINE_SMALL={}", inline_caps[1]),
        format!("-DUNPACK_INLINE_MEDIUM={}", inline_caps[2]),
        format!("-DUNPACK_INLINE_LARGE={}", inline_caps[3]),
    ];
    let source = CString::new(SOURCE).expect("kernel source has no NUL");
    let program = Program(
        nvrtc::result::create_program(&source, Some(c"unpack.cu"))
            .map_err(|e| Error::backend(format!("unpack: NVRTC create program: {e:?}")))?,
    );
    // SAFETY: a live program; options are plain strings.
    if let Err(e) = unsafe { nvrtc::result::compile_program(program.0, &options) } {
        // SAFETY: a live program.
        let log = unsafe { nvrtc::result::get_program_log(program.0) }
            .map(|raw| raw.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect::<String>())
            .unwrap_or_default();
        return Err(Error::backend(format!("unpack: NVRTC failed to compile for {target} ({e:?}): {log}")));
    }
    let image = if cubin {
        let mut size = 0usize;
        // SAFETY: a compiled program; the buffer has the size NVRTC reported.
        let bytes = unsafe {
            nvrtc::sys::nvrtcGetCUBINSize(program.0, &mut size).result().and_then(|()| {
                let mut bytes = vec![0u8; size];
                nvrtc::sys::nvrtcGetCUBIN(program.0, bytes.as_mut_ptr().cast()).result().map(|()| bytes)
            })
        }
        .map_err(|e| Error::backend(format!("unpack: NVRTC cubin: {e:?}")))?;
        nvrtc::Ptx::from_binary(bytes)
    } else {
        // SAFETY: a compiled program.
        let ptx = unsafe { nvrtc::result::get_ptx(program.0) }
            .map_err(|e| Error::backend(format!("unpack: NVRTC PTX: {e:?}")))?;
        nvrtc::Ptx::from_src(ptx.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect::<String>())
    };
    Ok((target, image))
}

fn supported_archs() -> Result<Vec<i32>> {
    let mut count = 0;
    // SAFETY: writes one int, then `count` ints into a buffer of that size.
    unsafe {
        nvrtc::sys::nvrtcGetNumSupportedArchs(&mut count).result().and_then(|()| {
            let mut archs = vec![0i32; count.max(0) as usize];
            nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()).result().map(|()| archs)
        })
    }
    .map_err(|e| Error::backend(format!("unpack: NVRTC supported architectures: {e:?}")))
}

struct Program(nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program, destroyed once.
        let _ = unsafe { nvrtc::result::destroy_program(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel source must compile wherever NVRTC is installed, GPU or not; both output kinds.
    #[test]
    fn kernel_source_compiles_to_cubin_and_ptx() {
        // SAFETY: only dlopens candidate library names.
        if testkit::skip_without("NVRTC", unsafe { nvrtc::sys::is_culib_present() }) {
            return;
        }
        let archs = supported_archs().unwrap();
        assert!(!archs.is_empty());
        let newest = *archs.iter().max().unwrap();
        let (target, image) = compile(newest, &[INLINE_TINY, INLINE_SMALL, INLINE_MEDIUM, INLINE_LARGE]).unwrap();
        assert_eq!(target, format!("sm_{newest}"));
        let cubin = format!("{image:?}");
        assert!(cubin.contains("Binary"), "expected a cubin image");
        // An architecture newer than NVRTC knows falls back to PTX of the newest it knows.
        let (target, image) = compile(newest + 1, &[INLINE_TINY, INLINE_SMALL, 0, 0]).unwrap();
        assert_eq!(target, format!("compute_{newest}"));
        let ptx = image.to_src();
        assert!(ptx.contains(".entry unpack_tiles") && ptx.contains(".entry unpack_inline_small"));
        assert!(ptx.contains(".entry unpack_inline_tiny"));
        assert!(!ptx.contains("unpack_inline_large"), "disabled variants are left out");
    }
}
