//! A piece's memory as the kernel's scatter/gather lists: header and payload segments go out in one
//! `sendmsg`, and a payload spread over segments arrives with one `recvmsg`. Runs of small
//! segments pass through a bounce buffer instead, one entry for the run: the kernel's copy pays
//! per iovec, and a copy in userspace of many small blocks into one buffer costs less than that.

use std::cell::RefCell;

use crate::transport::IoSeg;

/// iovecs one call takes at most: 64 segments of 4 KiB fill a 256 KiB piece in one call, and a
/// piece of more (smaller) segments just takes more calls. On the stack, so no call allocates.
pub const MAX_IOV: usize = 128;

/// Segments shorter than this go through the bounce buffer. 512 B blocks of a shuffled table moved
/// about 2x faster gathered than as an iovec each over loopback TCP (2-core VM, both ends), 1 KiB
/// ones 10-20 % faster, 2 KiB and more no faster.
pub const BOUNCE_BELOW: usize = 2 << 10;

/// Bytes of small segments one call moves through the bounce buffer at most: the buffer of a
/// thread that moved them (one per thread, kept for the next call), and what a sender copies
/// again when the socket takes less than it gathered.
pub const BOUNCE_LEN: usize = 64 << 10;

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether any of `segs` goes through the bounce buffer.
pub fn has_small(segs: &[IoSeg]) -> bool {
    segs.len() > 1 && segs.iter().any(|s| s.len < BOUNCE_BELOW)
}

/// Runs `f` with this thread's bounce buffer, at least `want` bytes long up to [`BOUNCE_LEN`]
/// (grown only as far as a call needed, so a thread moving small requests keeps a small one).
pub fn with_bounce<R>(want: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with_borrow_mut(|b| {
        let want = want.clamp(1, BOUNCE_LEN);
        if b.len() < want {
            b.resize(want, 0);
        }
        f(b)
    })
}

/// Fills `out` with the bytes of `segs` from byte `skip` of their concatenation on, at most
/// `limit` bytes, as many as fit: a segment of [`BOUNCE_BELOW`] bytes or more is an entry of its
/// own; the parts of shorter ones take consecutive bytes of `bounce`, one entry per run of them,
/// each handed to `small(its segment's index, the part's address, its bytes in bounce)`. Without
/// a bounce buffer (empty) every segment is an entry of its own. Stops where `out` or `bounce` is
/// full; the same arguments always walk the same bytes, so a walk limited to what a call moved
/// visits a prefix of the parts the call's walk did. Returns how many entries it filled.
pub fn walk(
    segs: &[IoSeg],
    mut skip: usize,
    mut limit: usize,
    out: &mut [libc::iovec],
    bounce: &mut [u8],
    mut small: impl FnMut(usize, usize, &mut [u8]),
) -> usize {
    let mut n = 0;
    let mut used = 0;
    // Whether entry `n - 1` is the bounce run that ends at `used`.
    let mut in_run = false;
    for (i, seg) in segs.iter().enumerate() {
        if limit == 0 {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let addr = seg.addr + skip;
        let want = (seg.len - skip).min(limit);
        skip = 0;
        if seg.len >= BOUNCE_BELOW || bounce.is_empty() {
            if n == out.len() {
                break;
            }
            out[n] = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: want };
            n += 1;
            in_run = false;
            limit -= want;
            continue;
        }
        let len = want.min(bounce.len() - used);
        if len == 0 || !in_run && n == out.len() {
            break;
        }
        let part = &mut bounce[used..used + len];
        if in_run {
            out[n - 1].iov_len += len;
        } else {
            out[n] = libc::iovec { iov_base: part.as_mut_ptr().cast(), iov_len: len };
            n += 1;
            in_run = true;
        }
        small(i, addr, part);
        used += len;
        limit -= len;
        if len < want {
            // The bounce buffer is full: what follows would not be next to these bytes.
            break;
        }
    }
    n
}

/// As [`walk`], copying each small part into `bounce` for a send.
///
/// # Safety
/// Every segment is readable memory nobody writes meanwhile.
pub unsafe fn gather(segs: &[IoSeg], skip: usize, out: &mut [libc::iovec], bounce: &mut [u8]) -> usize {
    walk(segs, skip, usize::MAX, out, bounce, |i, addr, part| {
        if let Some(ahead) = segs.get(i + PREFETCH_AHEAD) {
            prefetch(*ahead);
        }
        // SAFETY: per the contract, `part.len()` bytes at `addr` lie inside a readable segment.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, part.as_mut_ptr(), part.len()) }
    })
}

/// After a receive of `got` bytes into the entries [`walk`] made of `segs` from `skip` with
/// `bounce`: copies the small parts among them from `bounce` to their place.
///
/// # Safety
/// Every segment is writable memory nobody else accesses meanwhile.
pub unsafe fn unbounce(segs: &[IoSeg], skip: usize, got: usize, out: &mut [libc::iovec], bounce: &mut [u8]) {
    walk(segs, skip, got, out, bounce, |_, addr, part| {
        // SAFETY: per the contract, `part.len()` bytes at `addr` lie inside a writable segment.
        unsafe { copy_streaming(part, addr as *mut u8) }
    });
    store_fence();
}

/// Segments a gather asks the CPU to fetch ahead of the one it copies: blocks of a shuffled table
/// are far apart, so the hardware's prefetcher meets each one cold; 8 ahead cut a gather of 512 B
/// blocks by about a quarter (2-core VM).
const PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to bring `seg`'s lines (those of a small segment) into its caches.
fn prefetch(seg: IoSeg) {
    #[cfg(target_arch = "x86_64")]
    for line in (seg.addr..seg.addr + seg.len.min(BOUNCE_BELOW)).step_by(CACHE_LINE) {
        // SAFETY: a prefetch is a hint that never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = seg;
}

const CACHE_LINE: usize = 64;

/// Parts at least this long are written with streaming stores: scattered over memory nobody reads
/// soon, cached stores first read every line they fill (512 B blocks scattered: 8 ms a 48 MiB
/// request against 4-6 ms streamed, 2-core VM); a shorter part holds too few whole lines to gain.
const STREAM_MIN: usize = 4 * CACHE_LINE;

/// Copies `src` to `dst`, the whole cache lines of `dst` with streaming stores where that gains
/// (x86-64 and at least [`STREAM_MIN`] bytes): partial lines stay cached stores, since a
/// streaming store of part of a line costs more than the read it saves. Callers fence with
/// [`store_fence`] before anyone may read what they wrote.
///
/// # Safety
/// `dst` is writable for `src.len()` bytes that nobody else accesses meanwhile, and does not
/// overlap `src`.
unsafe fn copy_streaming(src: &[u8], dst: *mut u8) {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= STREAM_MIN {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = (dst as usize).next_multiple_of(CACHE_LINE) - dst as usize;
        let lines = (src.len() - head) / CACHE_LINE;
        let body = head + lines * CACHE_LINE;
        // SAFETY: per the contract; `head` and the tail lie inside `dst`'s `src.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head);
            for at in (head..body).step_by(16) {
                // `dst + at` is 16-byte aligned: `dst + head` is a line's start.
                let v = _mm_loadu_si128(src.as_ptr().add(at).cast::<__m128i>());
                _mm_stream_si128(dst.add(at).cast::<__m128i>(), v);
            }
            std::ptr::copy_nonoverlapping(src.as_ptr().add(body), dst.add(body), src.len() - body);
        }
        return;
    }
    // SAFETY: per the contract.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
}

/// Orders the streaming stores before it ahead of every store after it (the atomics that say a
/// piece landed): x86's ordinary orderings do not cover streaming stores.
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions (SSE, part of x86-64).
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Copies `src` into the concatenation of `segs`, starting at byte `at` of it.
///
/// # Safety
/// Every segment is writable memory nobody else accesses meanwhile, and `at + src.len()` is at
/// most their total length.
pub unsafe fn scatter(src: &[u8], segs: &[IoSeg], mut at: usize) {
    let mut src = src;
    for seg in segs {
        if src.is_empty() {
            break;
        }
        if at >= seg.len {
            at -= seg.len;
            continue;
        }
        let n = (seg.len - at).min(src.len());
        // SAFETY: per the contract, `[seg.addr + at, + n)` lies inside a writable segment.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (seg.addr + at) as *mut u8, n) };
        src = &src[n..];
        at = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::testutil::XorShift;

    fn empty() -> [libc::iovec; 4] {
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 4]
    }

    fn walked(segs: &[IoSeg], skip: usize, out: &mut [libc::iovec], bounce: &mut [u8]) -> Vec<(usize, usize)> {
        let n = walk(segs, skip, usize::MAX, out, bounce, |_, _, _| {});
        out[..n].iter().map(|v| (v.iov_base as usize, v.iov_len)).collect()
    }

    #[test]
    fn without_a_bounce_buffer_each_segment_is_an_entry_and_the_walk_stops_when_full() {
        let segs = [IoSeg { addr: 100, len: 10 }, IoSeg { addr: 500, len: 5 }, IoSeg { addr: 900, len: 7 }];
        let mut out = empty();
        assert_eq!(walked(&segs, 0, &mut out, &mut []), [(100, 10), (500, 5), (900, 7)]);
        assert_eq!(walked(&segs, 12, &mut out, &mut []), [(502, 3), (900, 7)]);
        assert_eq!(walked(&segs, 22, &mut out, &mut []), [], "all moved");
        assert_eq!(walked(&segs, 3, &mut out[..1], &mut []), [(103, 7)]);
    }

    #[test]
    fn runs_of_small_segments_share_one_entry_in_the_bounce_buffer() {
        let big = BOUNCE_BELOW;
        let segs = [
            IoSeg { addr: 1 << 20, len: 10 },
            IoSeg { addr: 2 << 20, len: 5 },
            IoSeg { addr: 3 << 20, len: big },
            IoSeg { addr: 4 << 20, len: 7 },
        ];
        let mut bounce = [0u8; 64];
        let b = bounce.as_ptr() as usize;
        let mut out = empty();
        assert_eq!(walked(&segs, 0, &mut out, &mut bounce), [(b, 15), (3 << 20, big), (b + 15, 7)]);
        assert_eq!(walked(&segs, 12, &mut out, &mut bounce), [(b, 3), (3 << 20, big), (b + 3, 7)]);
        // A full bounce buffer ends the walk: what follows would not be next to its bytes.
        assert_eq!(walked(&segs, 0, &mut out, &mut bounce[..12]), [(b, 12)]);
        // A full list still extends its last run.
        assert_eq!(walked(&segs, 0, &mut out[..1], &mut bounce), [(b, 15)]);
        let limited = walk(&segs, 0, 12, &mut out, &mut bounce, |_, _, _| {});
        assert_eq!((limited, out[0].iov_len), (1, 12), "at most `limit` bytes");
    }

    /// Mostly segments shorter than [`BOUNCE_BELOW`], some longer.
    fn seg_len(rng: &mut XorShift) -> usize {
        if rng.below(8) == 0 { BOUNCE_BELOW + rng.below(3 * BOUNCE_BELOW) } else { 1 + rng.below(BOUNCE_BELOW) }
    }

    /// Segments of `buf` of [`seg_len`] bytes totalling `total`, each at a random gap (so at any
    /// alignment) after the last.
    fn random_segs(rng: &mut XorShift, buf: &mut [u8], total: usize) -> Vec<IoSeg> {
        let (mut segs, mut at, mut left) = (Vec::new(), 0, total);
        while left > 0 {
            at += rng.below(70);
            let len = seg_len(rng).min(left);
            assert!(at + len <= buf.len(), "test buffer too small");
            segs.push(IoSeg { addr: buf.as_mut_ptr() as usize + at, len });
            (at, left) = (at + len, left - len);
        }
        segs
    }

    fn concat(segs: &[IoSeg]) -> Vec<u8> {
        // SAFETY: test segments lie in live buffers.
        segs.iter().flat_map(|s| unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.len) }.to_vec()).collect()
    }

    /// Up to `limit` bytes of `stream` from `at` on into the iovecs, as a `recvmsg` would;
    /// returns how many (at least one).
    fn deliver(stream: &[u8], out: &[libc::iovec], limit: usize) -> usize {
        let mut n = 0;
        for v in out {
            let k = v.iov_len.min(limit - n);
            // SAFETY: the iovecs point into live test buffers or the bounce buffer.
            unsafe { std::ptr::copy_nonoverlapping(stream[n..].as_ptr(), v.iov_base.cast::<u8>(), k) };
            n += k;
        }
        n
    }

    /// Bytes of `out` the kernel would take, as `sendmsg` copies them.
    fn take(out: &[libc::iovec], limit: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for v in out {
            let k = v.iov_len.min(limit - bytes.len());
            // SAFETY: as in `deliver`.
            bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), k) });
        }
        bytes
    }

    /// Many segments of random sizes and alignments, small and large mixed, moved through small
    /// bounce buffers and short lists by calls that each move a random part of what they offer
    /// (a socket that takes or delivers less): every byte reaches its place on both ends,
    /// segments and runs cut at any bounce or call boundary, nothing outside a segment written.
    #[test]
    fn gathered_and_unbounced_bytes_land_in_place_across_every_boundary() {
        // Seeded: the same cases every run.
        let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
        for case in 0..40 {
            let total = 1 + rng.below(200_000);
            let mut src: Vec<u8> = (0..3 * total + 4096).map(|i| (i * 131 % 251) as u8).collect();
            let mut dst = vec![0xeeu8; 3 * total + 4096];
            let src_segs = random_segs(&mut rng, &mut src, total);
            let dst_segs = random_segs(&mut rng, &mut dst, total);
            let mut bounce = vec![0u8; 1 + rng.below(3 * BOUNCE_BELOW)];
            let mut out = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 8];
            let mut wire = Vec::new();
            while wire.len() < total {
                let slots = 1 + rng.below(out.len());
                // SAFETY: the source segments lie in `src`, which nobody writes meanwhile.
                let n = unsafe { gather(&src_segs, wire.len(), &mut out[..slots], &mut bounce) };
                let offered: usize = out[..n].iter().map(|v| v.iov_len).sum();
                assert!(offered > 0, "case {case}: a call always moves something");
                wire.extend(take(&out[..n], 1 + rng.below(offered)));
            }
            assert!(wire == concat(&src_segs), "case {case}: the sender's bytes in order");
            let mut landed = 0;
            while landed < total {
                let slots = 1 + rng.below(out.len());
                let n = walk(&dst_segs, landed, usize::MAX, &mut out[..slots], &mut bounce, |_, _, _| {});
                let room: usize = out[..n].iter().map(|v| v.iov_len).sum();
                assert!(room > 0, "case {case}: a receive always has room");
                let got = deliver(&wire[landed..], &out[..n], 1 + rng.below(room.min(total - landed)));
                // SAFETY: the segments lie in `dst`, which nobody else touches.
                unsafe { unbounce(&dst_segs, landed, got, &mut out[..slots], &mut bounce) };
                landed += got;
            }
            assert!(concat(&dst_segs) == wire, "case {case}: every byte in its place");
            let untouched = dst.iter().filter(|&&b| b == 0xee).count();
            let expected = dst.len() - total + wire.iter().filter(|&&b| b == 0xee).count();
            assert_eq!(untouched, expected, "case {case}: nothing outside the segments written");
        }
    }

    /// Streaming copies of every length around the lines they cover, at every alignment, land
    /// exactly their bytes.
    #[test]
    fn streaming_copies_land_exactly_their_bytes_at_any_alignment() {
        let src: Vec<u8> = (0..1024).map(|i| (i * 7 + 3) as u8).collect();
        for offset in 0..CACHE_LINE {
            for len in [0, 1, 63, 64, STREAM_MIN - 1, STREAM_MIN, STREAM_MIN + 1, 300, 511, 512, 1000] {
                let mut dst = vec![0u8; 1200];
                let base = dst.as_ptr().align_offset(CACHE_LINE) + offset;
                // SAFETY: `base + len` lies inside `dst`, which nothing else touches.
                unsafe { copy_streaming(&src[..len], dst.as_mut_ptr().add(base)) };
                store_fence();
                assert_eq!(&dst[base..base + len], &src[..len], "offset {offset}, {len} bytes");
                assert!(dst[..base].iter().chain(&dst[base + len..]).all(|&b| b == 0), "only its bytes");
            }
        }
    }

    #[test]
    fn scatter_lands_bytes_across_segments() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 3];
        let segs = [IoSeg { addr: a.as_mut_ptr() as usize, len: 4 }, IoSeg { addr: b.as_mut_ptr() as usize, len: 3 }];
        // SAFETY: both arrays are live and 2 + 4 <= 7.
        unsafe { scatter(&[1, 2, 3, 4], &segs, 2) };
        assert_eq!((a, b), ([0, 0, 1, 2], [3, 4, 0]));
    }
}
