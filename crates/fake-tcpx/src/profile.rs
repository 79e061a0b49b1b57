//! Which plugin the fake stands in for: Google's GPUDirect-TCPX (`tcpx`, the default) or
//! GPUDirect-TCPXO, "FasTrak" (`tcpxo`), chosen by `FAKE_TCPX_PLUGIN_KIND`. Both run on the same
//! fake NIC; the kind picks the rules a consumer meets (the table, the handle, how requests are
//! tested and where received bytes land).
//!
//! The kind shapes the exported table, which a consumer copies out of the data symbol right after
//! `dlopen`, before any `init`. So, unlike the other knobs, it is read when the library is loaded
//! (`select`, called by a constructor), and `init` checks that the environment still says the same.

use std::ffi::c_int;
use std::sync::atomic::{AtomicU8, Ordering};

use uccl_tcpx::internal::ncclnet::{NCCL_INTERNAL_ERROR, NCCL_INVALID_ARGUMENT, NCCL_SYSTEM_ERROR};

pub const VAR: &str = "FAKE_TCPX_PLUGIN_KIND";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// GPUDirect-TCPX (`google/nccl-plugin-gpudirecttcpx`): devmem receives into a bounce pool.
    Tcpx,
    /// GPUDirect-TCPXO (`google/nccl-plugin-gpudirect-tcpxo` v1.0.17): receives land in the posted
    /// buffer, written by the NIC's transfer service.
    Tcpxo,
}

impl Kind {
    /// The knob's value (`None`: unset or empty).
    pub fn parse(v: Option<&str>) -> Result<Kind, String> {
        match v {
            None | Some("tcpx") => Ok(Kind::Tcpx),
            Some("tcpxo") => Ok(Kind::Tcpxo),
            Some(other) => Err(format!("{VAR}={other:?} is not valid: expected tcpx or tcpxo")),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Tcpx => "tcpx",
            Kind::Tcpxo => "tcpxo",
        }
    }

    /// The rc a failure reports. TCPXO turns every error into `ncclSystemError` (`ToNccl`,
    /// `nccl_cuda/cuda_common.h` L43) except its handle checks' `ncclRemoteError`
    /// (`fo/fastrak_plugin.cc` `Connect` L152-163), which pass as they are.
    pub fn rc(self, rc: c_int) -> c_int {
        match (self, rc) {
            (Kind::Tcpxo, NCCL_INTERNAL_ERROR | NCCL_INVALID_ARGUMENT) => NCCL_SYSTEM_ERROR,
            _ => rc,
        }
    }
}

/// TCPX until a constructor saw another kind.
static KIND: AtomicU8 = AtomicU8::new(0);

/// Records the kind the library was loaded as (the constructor does, before `dlopen` returns).
pub fn select(kind: Kind) {
    KIND.store(kind as u8, Ordering::Relaxed);
}

pub fn kind() -> Kind {
    match KIND.load(Ordering::Relaxed) {
        0 => Kind::Tcpx,
        _ => Kind::Tcpxo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_rcs() {
        assert_eq!(Kind::parse(None), Ok(Kind::Tcpx));
        assert_eq!(Kind::parse(Some("tcpxo")), Ok(Kind::Tcpxo));
        assert!(Kind::parse(Some("TCPXO")).unwrap_err().contains(VAR));
        assert_eq!(Kind::Tcpx.rc(NCCL_INTERNAL_ERROR), NCCL_INTERNAL_ERROR);
        assert_eq!(Kind::Tcpxo.rc(NCCL_INTERNAL_ERROR), NCCL_SYSTEM_ERROR);
        assert_eq!(Kind::Tcpxo.rc(NCCL_INVALID_ARGUMENT), NCCL_SYSTEM_ERROR);
        assert_eq!(Kind::Tcpxo.rc(6), 6, "ncclRemoteError of the handle checks");
    }
}
