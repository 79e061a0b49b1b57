//! The 128-byte listen handle. Bytes 0..32 are the socket transport's own handle (and 88..124 its
//! data links, where it has any); 32..44 mark it as this fake's; 44..48 hold the listener's data
//! socket count, which the connector uses as TCPX's does (`num_socks` of `tcpxHandle`, connect.cc
//! `tcpxConnectV5`); bytes 80..88 are where `connect` keeps its state between polls, exactly where
//! TCPX keeps its `connect_args` pointer (zero as written by `listen`).

use uccl_tcpx::internal::ncclnet::NCCL_NET_HANDLE_MAXSIZE;
use uccl_tcpx::internal::transport::NetHandle;

use crate::fail::{Fail, Result};

pub const HANDLE_LEN: usize = NCCL_NET_HANDLE_MAXSIZE;
pub const CONNECT_STATE: std::ops::Range<usize> = 80..88;
const MARK: std::ops::Range<usize> = 32..40;
const SOCKETS: std::ops::Range<usize> = 44..48;
const MAGIC: u64 = 0x5843_5054_454b_4146; // "FAKETPCX"

pub fn mark(h: &mut NetHandle, dev: usize, data_sockets: u32) {
    h[MARK].copy_from_slice(&MAGIC.to_le_bytes());
    h[40..44].copy_from_slice(&(dev as u32).to_le_bytes());
    h[SOCKETS].copy_from_slice(&data_sockets.to_le_bytes());
    h[CONNECT_STATE].fill(0);
}

pub fn check(h: &NetHandle) -> Result<()> {
    if h[MARK] != MAGIC.to_le_bytes() {
        return Err(Fail::internal("connect handle was not written by this plugin's listen"));
    }
    Ok(())
}

/// The listener's data socket count, bounded as TCPX bounds its own (`MAX_SOCKETS`).
pub fn data_sockets(h: &NetHandle) -> u32 {
    u32::from_le_bytes(h[SOCKETS].try_into().expect("4 bytes")).min(8)
}

pub fn connect_state(h: &NetHandle) -> usize {
    u64::from_le_bytes(h[CONNECT_STATE].try_into().expect("8 bytes")) as usize
}

/// Copies the caller's handle (any alignment).
///
/// # Safety
/// `p` points at 128 readable bytes.
pub unsafe fn read(p: *const u8) -> NetHandle {
    let mut h = [0u8; HANDLE_LEN];
    // SAFETY: per the contract.
    unsafe { std::ptr::copy_nonoverlapping(p, h.as_mut_ptr(), HANDLE_LEN) };
    h
}
