//! GPU mode: not available in this build yet.

use crate::fail::{Fail, Result};
use crate::memory::RxMemory;

pub fn rx_memory(_pool_bytes: usize) -> Result<Box<dyn RxMemory>> {
    Err(Fail::internal("FAKE_TCPX_MODE=gpu is not implemented yet"))
}

pub fn copy_to_host(_src: usize, _len: usize) -> Result<Vec<u8>> {
    Err(Fail::internal("FAKE_TCPX_MODE=gpu is not implemented yet"))
}
