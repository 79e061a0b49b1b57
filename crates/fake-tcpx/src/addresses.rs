//! Request pointers of TCPXO mode. TCPXO allocates each request and frees it when `test` reports it
//! done (`fo/nccl_shim.cc` `Test` L728), so a second test of it reads freed memory. The fake hands
//! out addresses that are unique for the life of the process and never reused, inside reserved
//! address space that no memory backs (`PROT_NONE`): a pointer it handed out and no longer knows is
//! one reported done (or of a closed comm), never a newer request that happens to share it.

use std::sync::Mutex;

use crate::fail::{Fail, Result};

/// Address space reserved at a time; a request takes `STRIDE` bytes of it (8 M requests a chunk).
const CHUNK: usize = 64 << 20;
const STRIDE: usize = 8;

struct Space {
    /// Base addresses of the reserved chunks, oldest first.
    chunks: Vec<usize>,
    /// Bytes of the newest chunk handed out.
    used: usize,
}

static SPACE: Mutex<Space> = Mutex::new(Space { chunks: Vec::new(), used: CHUNK });

fn space() -> std::sync::MutexGuard<'static, Space> {
    SPACE.lock().unwrap_or_else(|p| p.into_inner())
}

fn reserve() -> Result<usize> {
    // SAFETY: an anonymous PROT_NONE mapping: it reserves address space only, and no pointer into it
    // is ever dereferenced by the fake.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            CHUNK,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Fail::system(format!(
            "cannot reserve address space for request pointers: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(p as usize)
}

/// A request address never handed out before.
pub fn next() -> Result<usize> {
    let mut s = space();
    if s.used == CHUNK {
        let base = reserve()?;
        s.chunks.push(base);
        s.used = 0;
    }
    let addr = s.chunks.last().expect("a chunk was just reserved") + s.used;
    s.used += STRIDE;
    Ok(addr)
}

/// Whether `addr` was handed out by `next`.
pub fn issued(addr: usize) -> bool {
    let s = space();
    let last = s.chunks.len().saturating_sub(1);
    s.chunks.iter().enumerate().any(|(i, &base)| {
        let end = if i == last { base + s.used } else { base + CHUNK };
        (base..end).contains(&addr) && (addr - base).is_multiple_of(STRIDE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_and_recognised() {
        let a = next().unwrap();
        let b = next().unwrap();
        assert_ne!(a, b);
        assert!(issued(a) && issued(b));
        assert!(!issued(a + 1), "not an address handed out");
        assert!(!issued(0x1000));
    }
}
