//! The error every internal call returns: the `ncclResult_t` the entry point hands back and the text
//! it sends to the logger as a WARN first.

use std::ffi::c_int;

use uccl_tcpx::internal::ncclnet::{NCCL_INTERNAL_ERROR, NCCL_INVALID_ARGUMENT, NCCL_SYSTEM_ERROR};

#[derive(Clone, Debug)]
pub struct Fail {
    pub rc: c_int,
    pub msg: String,
}

pub type Result<T> = std::result::Result<T, Fail>;

impl Fail {
    /// rc 3, what TCPX returns for nearly every misuse.
    pub fn internal(msg: impl Into<String>) -> Fail {
        Fail { rc: NCCL_INTERNAL_ERROR, msg: msg.into() }
    }

    /// rc 2, TCPX's code for socket errors.
    pub fn system(msg: impl Into<String>) -> Fail {
        Fail { rc: NCCL_SYSTEM_ERROR, msg: msg.into() }
    }

    /// rc 4.
    pub fn argument(msg: impl Into<String>) -> Fail {
        Fail { rc: NCCL_INVALID_ARGUMENT, msg: msg.into() }
    }
}
