//! Which GPU an engine serves. One engine serves one GPU, known from creation where possible:
//! `UCCL_TCPX_GPU`, else the GPU whose context is current on the thread that creates the engine
//! (how UCCL's endpoint and a `cudaSetDevice` caller say it), else the first device registration.
//! A transport that binds comms to a GPU (TCPX) is never called without one: an engine that still
//! has none at its first listen or connect takes the connecting thread's current GPU, else GPU 0,
//! the device TCPX itself would have used.
//!
//! Once chosen, the GPU never changes, and the transport is told before it makes comms with it.
//!
//! Memory of any other GPU of the process is taken too, as UCCL's engine takes any pointer
//! (unified addressing): each path moves it in its owning GPU's context (the staged path on that
//! GPU's lane of a comm's ring, same-host copies on that GPU's queue, IPC handles exported there).
//! A transport that binds comms to one GPU (TCPX) refuses it when a comm registers it.

use std::sync::{Arc, OnceLock};

use crate::cuda::{self, Gpu};
use crate::error::{Error, Result, UcclStatus};
use crate::transport::Net;

/// How a GPU came to be chosen, for messages about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChosenBy {
    Configuration,
    CurrentContext,
    Registration,
    FirstConnection,
}

impl ChosenBy {
    fn describe(self) -> &'static str {
        match self {
            ChosenBy::Configuration => "named by UCCL_TCPX_GPU",
            ChosenBy::CurrentContext => "current when the engine was created",
            ChosenBy::Registration => "of its first device registration",
            ChosenBy::FirstConnection => "taken at its first connection, before any GPU was known",
        }
    }
}

#[derive(Default)]
pub(crate) struct ServedGpu {
    chosen: OnceLock<(Arc<Gpu>, ChosenBy)>,
    /// An identity without a GPU behind it, so that tests on machines without CUDA can give an
    /// engine the identity a GPU would (see `pretend`).
    #[cfg(test)]
    pretended: OnceLock<(i32, String)>,
}

impl ServedGpu {
    /// The GPU known when the engine is created: the configured one (an error when it cannot be
    /// opened), else the one current on the creating thread, else none yet.
    pub fn at_creation(configured: Option<i32>) -> Result<ServedGpu> {
        let served = ServedGpu::default();
        let found = match configured {
            Some(ordinal) => {
                let gpu = Gpu::open(ordinal).map_err(|e| e.context(format!("UCCL_TCPX_GPU={ordinal}")))?;
                Some((gpu, ChosenBy::Configuration))
            }
            None => match cuda::gpu::current_ordinal() {
                Some(ordinal) => match Gpu::open(ordinal) {
                    Ok(gpu) => Some((gpu, ChosenBy::CurrentContext)),
                    // The engine can still learn its GPU from a registration.
                    Err(e) => {
                        log::warn!("GPU {ordinal} is current but cannot be served: {}", e.message());
                        None
                    }
                },
                None => None,
            },
        };
        if let Some(found) = found {
            let _ = served.chosen.set(found);
        }
        Ok(served)
    }

    pub fn get(&self) -> Option<&Arc<Gpu>> {
        self.chosen.get().map(|(gpu, _)| gpu)
    }

    /// Ordinal and PCI bus id once a GPU is chosen; before that (and in host-only use) GPU "0", as
    /// engines without GPUs have always called themselves.
    pub fn identity(&self) -> (i32, &str) {
        if let Some((gpu, _)) = self.chosen.get() {
            return (gpu.ordinal(), gpu.bus_id());
        }
        #[cfg(test)]
        if let Some((ordinal, bus_id)) = self.pretended.get() {
            return (*ordinal, bus_id);
        }
        (0, "0")
    }

    /// The GPU `net`'s comms are bound to: the engine's, where `net` binds comms to a GPU.
    pub fn bound_by(&self, net: &dyn Net) -> Option<i32> {
        net.caps().binds_gpu.then(|| self.get().map(|gpu| gpu.ordinal())).flatten()
    }

    /// Tells `net` the GPU, when one is chosen (at creation, before any comm exists).
    pub fn tell(&self, net: &dyn Net) {
        if let Some(gpu) = self.get() {
            net.set_gpu(gpu);
        }
    }

    /// The engine's GPU: GPU `ordinal` if none was chosen yet, else the one chosen before. `net`
    /// learns it before any caller can use it.
    fn choose(&self, ordinal: i32, by: ChosenBy, net: &dyn Net) -> Result<&(Arc<Gpu>, ChosenBy)> {
        if self.chosen.get().is_none() {
            let gpu = Gpu::open(ordinal)?;
            if self.chosen.set((gpu, by)).is_ok() {
                log::info!("engine serves GPU {ordinal} ({})", by.describe());
            }
        }
        let chosen = self.chosen.get().ok_or_else(|| Error::new(UcclStatus::ErrInternal, "GPU choice lost"))?;
        net.set_gpu(&chosen.0);
        Ok(chosen)
    }

    /// Memory of GPU `ordinal` is being registered: the engine serves that GPU, choosing it now
    /// if none is yet, and takes memory of any other GPU the process reaches. What each GPU's
    /// transfers use under a connection's lock (the unpack kernel, the inline copier) is built
    /// here, on the caller's registering thread, which holds no lock.
    pub fn serve(&self, ordinal: i32, net: &dyn Net) -> Result<()> {
        let (served, by) = self.choose(ordinal, ChosenBy::Registration, net)?;
        let gpu = if served.ordinal() == ordinal {
            served.clone()
        } else {
            Gpu::open(ordinal).map_err(|e| {
                e.context(format!(
                    "memory of GPU {ordinal} (this engine serves GPU {}, {})",
                    served.ordinal(),
                    by.describe()
                ))
            })?
        };
        cuda::segments::TileCopier::build(&gpu);
        // The inline copier's stream and pinned bounce buffer, so that the first inline transfer
        // of this GPU's memory allocates nothing.
        if let Err(e) = cuda::small_copy::SmallCopier::for_gpu(&gpu) {
            log::debug!("GPU {ordinal}: no inline copier yet ({}); made at the first inline transfer", e.message());
        }
        Ok(())
    }

    /// Called before every connection's first listen or connect: a transport that binds comms to
    /// a GPU gets one now if the engine has none yet (the calling thread's current GPU, else GPU
    /// 0), so no comm is ever bound to a GPU the engine does not serve; any other is told the GPU
    /// chosen so far.
    pub fn before_comms(&self, net: &dyn Net) -> Result<()> {
        if !net.caps().binds_gpu {
            // A transport made after the GPU was chosen (the socket transport of same-host peers)
            // learns it before its first comm, which stages through it.
            self.tell(net);
            return Ok(());
        }
        if self.chosen.get().is_some() {
            return Ok(());
        }
        let ordinal = cuda::gpu::current_ordinal().unwrap_or(0);
        let (gpu, by) = self.choose(ordinal, ChosenBy::FirstConnection, net)?;
        if *by != ChosenBy::FirstConnection {
            return Ok(());
        }
        log::warn!(
            "the {} transport binds comms to a GPU and this engine had none yet: it serves GPU {} ({}) from now \
             on; set UCCL_TCPX_GPU or make the GPU current when creating the engine to choose another",
            net.caps().name,
            gpu.ordinal(),
            gpu.bus_id()
        );
        Ok(())
    }

    /// On a caller's thread (engine creation, a connect, an accept): a transport that binds comms
    /// to a GPU unpacks every receive out of a devmem pool with the GPU's kernel, through an
    /// unpacker made at the first receive under the connection's lock; the kernel is built here,
    /// once per process, so that the unpacker finds it. Not on the library's own threads (an
    /// accepted connection's handshake, which may choose the GPU; `Engine::accept` builds it
    /// then): a process that exits while NVRTC compiles crashes in NVRTC's exit handlers, and a
    /// caller's thread is busy in the library only while the caller waits for it.
    pub fn build_unpack_kernel(&self, net: &dyn Net) {
        if let Some(gpu) = self.get()
            && net.caps().binds_gpu
        {
            cuda::segments::TileCopier::build(gpu);
        }
    }

    /// Gives an engine without a GPU the identity of one (ordinal and bus id in the handshake and,
    /// had none been handed out yet, in its metadata), without CUDA.
    #[cfg(test)]
    pub fn pretend(&self, ordinal: i32, bus_id: &str) {
        assert!(self.chosen.get().is_none(), "a real GPU was chosen already");
        self.pretended.set((ordinal, bus_id.to_owned())).expect("one pretended identity per engine");
    }
}
