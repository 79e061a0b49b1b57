//! The host memory TCPX holds per comm from connect or accept until close, held here too so that
//! memory figures over the fake carry what an A3 connection costs (docs/TCPX.md, "Setup"). Per
//! data socket `MAX_TASKS` (`src/work_queue.h`) tasks, each with a data pipe (`tcpxTaskInit`,
//! `sock/datapipe.cc` `tcpxDataPipeInit`): its control-message buffer (64 KiB, inside the pipe), a
//! chunk-sized buffer and a scatter list (2,048 x 16 bytes). A receive comm also keeps its
//! page-token table (`devcomm/unpack_defs1.h` `tcpxRecord`: queue depth 16 x 8 sockets x 2,048
//! tokens of 8 bytes), pinned in TCPX, pageable here. `tcpxCalloc` zeroes what it allocates, so
//! every page is resident from the start; here each page is written once.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;
use crate::profile::Kind;

/// Comms holding a footprint in this process, the bytes they hold, and the footprints ever made
/// (`fake_tcpx_comms`).
pub static HELD_COMMS: AtomicU64 = AtomicU64::new(0);
pub static HELD_BYTES: AtomicU64 = AtomicU64::new(0);
pub static MADE_COMMS: AtomicU64 = AtomicU64::new(0);

/// Tasks per data socket (`src/work_queue.h`).
const TASKS_PER_SOCKET: usize = 6;
/// A pipe's control-message buffer: 2,048 pages' `CMSG_SPACE(sizeof(struct iovec))`.
const CTRL_DATA: usize = 2048 * 32;
/// A pipe's scatter list: 2,048 `union loadMeta` of 16 bytes.
const SCATTER_LIST: usize = 2048 * 16;
/// A receive comm's page-token table.
const PAGE_TOKENS: usize = 16 * 8 * 2048 * 8;

/// Host memory held the way TCPX holds it for one comm; freed with the comm.
pub struct Footprint {
    /// Held, never read: freed with the comm.
    _buffers: Vec<Box<[u8]>>,
}

impl Footprint {
    /// What TCPX allocates for a comm of `data_sockets` sockets sending or receiving in chunks of
    /// `chunk` bytes; `receive` adds the page-token table.
    pub fn tcpx(data_sockets: u32, chunk: usize, receive: bool) -> Footprint {
        let pipes = data_sockets as usize * TASKS_PER_SOCKET;
        let mut sizes = vec![CTRL_DATA + chunk + SCATTER_LIST; pipes];
        if receive {
            sizes.push(PAGE_TOKENS);
        }
        let bytes: usize = sizes.iter().sum();
        HELD_COMMS.fetch_add(1, Ordering::Relaxed);
        HELD_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
        MADE_COMMS.fetch_add(1, Ordering::Relaxed);
        Footprint { _buffers: sizes.into_iter().map(resident).collect() }
    }

    /// What the plugin `cfg` stands in for holds for a send or a `receive` comm: TCPX's, and
    /// nothing for TCPXO, whose own was not read.
    pub fn of(cfg: &Config, receive: bool) -> Footprint {
        match cfg.kind {
            Kind::Tcpx => Footprint::tcpx(cfg.setup.data_sockets, cfg.chunk_bytes, receive),
            Kind::Tcpxo => Footprint::none(),
        }
    }

    /// Nothing.
    pub fn none() -> Footprint {
        Footprint { _buffers: Vec::new() }
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self._buffers.iter().map(|b| b.len()).sum()
    }
}

impl Drop for Footprint {
    fn drop(&mut self) {
        if self._buffers.is_empty() {
            return;
        }
        let bytes: usize = self._buffers.iter().map(|b| b.len()).sum();
        HELD_COMMS.fetch_sub(1, Ordering::Relaxed);
        HELD_BYTES.fetch_sub(bytes as u64, Ordering::Relaxed);
    }
}

/// `len` zeroed bytes, every page of them written once so that it is resident, as `memset` makes
/// TCPX's.
fn resident(len: usize) -> Box<[u8]> {
    let mut buf = vec![0u8; len].into_boxed_slice();
    for at in (0..len).step_by(4096) {
        // SAFETY: `at` is within `buf`. Volatile: a store into memory only ever freed afterwards
        // may otherwise be left out.
        unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(at), 0) };
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `buf` the kernel reports resident, of those wholly inside it.
    fn resident_pages(buf: &[u8]) -> (usize, usize) {
        let page = 4096;
        let start = (buf.as_ptr() as usize).next_multiple_of(page);
        let end = (buf.as_ptr() as usize + buf.len()) / page * page;
        let pages = (end - start) / page;
        let mut vec = vec![0u8; pages];
        // SAFETY: a page-aligned range inside a live allocation, and a vector of one byte a page.
        let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        (vec.iter().filter(|&&v| v & 1 == 1).count(), pages)
    }

    #[test]
    fn a_comm_holds_what_tcpx_allocates_and_every_page_is_resident() {
        let send = Footprint::tcpx(2, 512 << 10, false);
        assert_eq!(send.bytes(), 2 * 6 * ((64 << 10) + (512 << 10) + (32 << 10)));
        let recv = Footprint::tcpx(2, 512 << 10, true);
        assert_eq!(recv.bytes(), send.bytes() + (2 << 20));
        for buf in &recv._buffers {
            let (resident, pages) = resident_pages(buf);
            assert!(pages > 0);
            assert_eq!(resident, pages, "every page of a {} byte buffer is resident", buf.len());
        }
        assert_eq!(Footprint::none().bytes(), 0);
    }
}
