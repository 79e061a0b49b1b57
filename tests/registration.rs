//! Registration refuses memory a peer's access would fault on: unmapped ranges, `PROT_NONE` and
//! read-only mappings, and ranges that run into a hole. Before this check, `reg` accepted them and
//! the first remote write killed the target process.

use uccl_tcpx::{Engine, UcclStatus};

mod common;

const PAGE: usize = 4096;

fn engine() -> Engine {
    Engine::new(common::loopback()).unwrap()
}

/// An anonymous mapping of `pages` pages with `prot`, unmapped on drop.
struct Map {
    addr: usize,
    len: usize,
}

impl Map {
    fn new(pages: usize, prot: libc::c_int) -> Map {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Map { addr: p as usize, len }
    }

    fn protect(&self, page: usize, prot: libc::c_int) {
        // SAFETY: the page lies inside this mapping, which only this test uses.
        let rc = unsafe { libc::mprotect((self.addr + page * PAGE) as *mut libc::c_void, PAGE, prot) };
        assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
    }

    fn unmap_page(&self, page: usize) {
        // SAFETY: as above; the hole is never accessed afterwards.
        let rc = unsafe { libc::munmap((self.addr + page * PAGE) as *mut libc::c_void, PAGE) };
        assert_eq!(rc, 0, "munmap: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped (pages already unmapped are ignored by the kernel).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn refused(e: &Engine, addr: usize, len: usize, why: &str) {
    let err = e.register(addr, len).expect_err("registration of inaccessible memory succeeded");
    assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{err}");
    assert!(err.message().contains(why), "expected {why:?} in: {err}");
}

#[test]
fn inaccessible_memory_is_refused_with_the_reason() {
    let e = engine();
    let none = Map::new(4, libc::PROT_NONE);
    refused(&e, none.addr, none.len, "without read access");
    let read_only = Map::new(4, libc::PROT_READ);
    refused(&e, read_only.addr + 100, 1000, "without write access");

    let holed = Map::new(4, libc::PROT_READ | libc::PROT_WRITE);
    holed.unmap_page(2);
    refused(&e, holed.addr, holed.len, "is not mapped");
    // The pages before the hole are fine on their own.
    let ok = e.register(holed.addr, 2 * PAGE).unwrap();
    e.deregister(ok).unwrap();

    let guarded = Map::new(4, libc::PROT_READ | libc::PROT_WRITE);
    guarded.protect(3, libc::PROT_NONE);
    refused(&e, guarded.addr + PAGE, 3 * PAGE, "without read access");
}

#[test]
fn ordinary_memory_still_registers() {
    let e = engine();
    let heap = vec![0u8; 1 << 20];
    let mr = e.register(heap.as_ptr() as usize, heap.len()).unwrap();
    e.deregister(mr).unwrap();
    let map = Map::new(16, libc::PROT_READ | libc::PROT_WRITE);
    let mr = e.register(map.addr, map.len).unwrap();
    e.deregister(mr).unwrap();
    let stack = [0u8; 256];
    let mr = e.register(stack.as_ptr() as usize, stack.len()).unwrap();
    e.deregister(mr).unwrap();
}
