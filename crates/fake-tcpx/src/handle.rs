//! The 128-byte listen handle, laid out where a consumer can observe it as the plugin being stood in
//! for lays out its own.
//!
//! TCPX: bytes 0..32 are the socket transport's own handle (and 88..124 its data links, where it
//! has any); 32..44 mark it as this fake's; 44..48 hold the listener's data socket count, which the
//! connector uses as TCPX's does (`num_socks` of `tcpxHandle`, connect.cc `tcpxConnectV5`); bytes
//! 80..88 are where `connect` keeps its state between polls, exactly where TCPX keeps its
//! `connect_args` pointer (zero as written by `listen`).
//!
//! TCPXO (`ncclSocketHandle`, `fo/common.h` L112-123, 104 bytes): byte 0 is the handle version (1),
//! byte 1 the listener's FasTrak index (255: unset), and bytes 88..104 the connect stage, a state
//! byte at 88 (0 start, 1 connecting, 3 done: `ncclSocketCommState`, L92-97) and the comm being
//! connected at 96..104 (`ncclSocketCommStage`, L99-102); `listen` writes state 0 and NULL there.
//! What TCPXO keeps in between (the control address, the NIC's address and ports) is its own; the
//! fake keeps the transport's handle at 8..40, its mark at 40..48, the device at 48..52 and the
//! socket count at 52..56.

use std::ops::Range;

use uccl_tcpx::internal::ncclnet::NCCL_NET_HANDLE_MAXSIZE;
use uccl_tcpx::internal::transport::NetHandle;

use crate::fail::{Fail, Result};
use crate::profile::Kind;

pub const HANDLE_LEN: usize = NCCL_NET_HANDLE_MAXSIZE;
pub const CONNECT_STATE: Range<usize> = 80..88;
const MAGIC: u64 = 0x5843_5054_454b_4146; // "FAKETPCX"
const TRANSPORT_LEN: usize = 32;

/// TCPXO's `kNcclSocketHandleVersion` and `kFastrakInvalidIdx` (`fo/common.h` L48-50).
pub const TCPXO_VERSION: u8 = 1;
pub const TCPXO_NO_INDEX: u8 = u8::MAX;
/// TCPXO's connect stage: the state byte, and the comm pointer (8-byte aligned after it).
pub const TCPXO_STATE: usize = 88;
pub const TCPXO_COMM: Range<usize> = 96..104;
/// `ncclSocketCommState` values (`fo/common.h` L92-97).
pub const TCPXO_START: u8 = 0;
pub const TCPXO_CONNECTING: u8 = 1;
pub const TCPXO_DONE: u8 = 3;

/// Where the fake keeps its own fields in each layout.
struct Layout {
    transport: usize,
    mark: usize,
}

fn layout(kind: Kind) -> Layout {
    match kind {
        Kind::Tcpx => Layout { transport: 0, mark: 32 },
        Kind::Tcpxo => Layout { transport: 8, mark: 40 },
    }
}

/// The handle `listen` writes for the socket transport's handle `transport`, on device `dev`.
pub fn write(kind: Kind, transport: &NetHandle, dev: usize, data_sockets: u32, fastrak_index: u8) -> NetHandle {
    let l = layout(kind);
    let mut h = match kind {
        // The transport's handle stays where it is, links included.
        Kind::Tcpx => *transport,
        Kind::Tcpxo => {
            let mut h = [0u8; HANDLE_LEN];
            h[0] = TCPXO_VERSION;
            h[1] = fastrak_index;
            h[l.transport..l.transport + TRANSPORT_LEN].copy_from_slice(&transport[..TRANSPORT_LEN]);
            h
        }
    };
    h[l.mark..l.mark + 8].copy_from_slice(&MAGIC.to_le_bytes());
    h[l.mark + 8..l.mark + 12].copy_from_slice(&(dev as u32).to_le_bytes());
    h[l.mark + 12..l.mark + 16].copy_from_slice(&data_sockets.to_le_bytes());
    match kind {
        Kind::Tcpx => h[CONNECT_STATE].fill(0),
        Kind::Tcpxo => h[TCPXO_STATE..TCPXO_COMM.end].fill(0),
    }
    h
}

pub fn check(kind: Kind, h: &NetHandle) -> Result<()> {
    let at = layout(kind).mark;
    if h[at..at + 8] != MAGIC.to_le_bytes() {
        return Err(Fail::internal("connect handle was not written by this plugin's listen"));
    }
    Ok(())
}

/// The socket transport's handle inside `h`.
pub fn transport(kind: Kind, h: &NetHandle) -> NetHandle {
    match kind {
        Kind::Tcpx => *h,
        Kind::Tcpxo => {
            let at = layout(kind).transport;
            let mut t = [0u8; HANDLE_LEN];
            t[..TRANSPORT_LEN].copy_from_slice(&h[at..at + TRANSPORT_LEN]);
            t
        }
    }
}

/// The listener's data socket count, bounded as TCPX bounds its own (`MAX_SOCKETS`).
pub fn data_sockets(kind: Kind, h: &NetHandle) -> u32 {
    let at = layout(kind).mark + 12;
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes")).min(8)
}

/// TCPX: the connect in progress, bytes 80..88 (0: none yet).
pub fn connect_state(h: &NetHandle) -> usize {
    u64::from_le_bytes(h[CONNECT_STATE].try_into().expect("8 bytes")) as usize
}

/// TCPXO: the connect stage, bytes 88..104: the state byte and the comm pointer.
pub fn tcpxo_stage(h: &NetHandle) -> (u8, usize) {
    (h[TCPXO_STATE], u64::from_le_bytes(h[TCPXO_COMM].try_into().expect("8 bytes")) as usize)
}

/// Writes TCPXO's connect stage into the caller's handle.
///
/// # Safety
/// `p` points at the caller's 128 writable handle bytes.
pub unsafe fn set_tcpxo_stage(p: *mut u8, state: u8, comm: usize) {
    // SAFETY: per the contract, both ranges lie inside the handle; the caller's buffer may be
    // unaligned, so bytes are copied.
    unsafe {
        p.add(TCPXO_STATE).write(state);
        std::ptr::copy_nonoverlapping((comm as u64).to_le_bytes().as_ptr(), p.add(TCPXO_COMM.start), 8);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let mut t = [0u8; HANDLE_LEN];
        t[..TRANSPORT_LEN].copy_from_slice(&[7u8; TRANSPORT_LEN]);
        let tcpx = write(Kind::Tcpx, &t, 2, 3, 0);
        assert_eq!(&tcpx[..TRANSPORT_LEN], &t[..TRANSPORT_LEN]);
        assert!(check(Kind::Tcpx, &tcpx).is_ok());
        assert_eq!((data_sockets(Kind::Tcpx, &tcpx), connect_state(&tcpx)), (3, 0));
        let o = write(Kind::Tcpxo, &t, 2, 3, 5);
        assert_eq!((o[0], o[1]), (TCPXO_VERSION, 5));
        assert_eq!(tcpxo_stage(&o), (TCPXO_START, 0));
        assert!(check(Kind::Tcpxo, &o).is_ok() && check(Kind::Tcpx, &o).is_err());
        assert_eq!(data_sockets(Kind::Tcpxo, &o), 3);
        assert_eq!(transport(Kind::Tcpxo, &o), t, "the transport's handle comes back whole");
        let mut c = o;
        // SAFETY: c is a 128-byte handle.
        unsafe { set_tcpxo_stage(c.as_mut_ptr(), TCPXO_CONNECTING, 0x1234_5678) };
        assert_eq!(tcpxo_stage(&c), (TCPXO_CONNECTING, 0x1234_5678));
        assert_eq!(&c[..TCPXO_STATE], &o[..TCPXO_STATE], "nothing else changes");
    }
}
