//! A devmem receive's fragment list (`loadMeta`s): validated against the pool and the posted
//! buffer, merged into runs, and, for host memory on both sides, copied on the CPU. The plugin
//! checks none of this (it trusts the sender's size), so nothing here trusts the plugin either.

use crate::cuda::unpack::DstPiece;
use crate::error::{Error, Result};
use crate::ncclnet::{LoadMeta, UNPACK_MAX_SLICE_PAGES};

/// `src_off` is a u32: no pool the plugin can describe is larger (RxDM's pools are exactly 4 GiB).
pub const MAX_POOL_LEN: u64 = 1 << 32;

/// `len` bytes at `pool + src` belong at `destination + dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// A published fragment count, refused beyond the unpack queue's 2048 entries per slot.
pub fn check_count(cnt: u64) -> Result<usize> {
    if cnt > UNPACK_MAX_SLICE_PAGES as u64 {
        return Err(Error::backend(format!(
            "net plugin reported {cnt} fragments for one receive; at most {UNPACK_MAX_SLICE_PAGES} fit its queue"
        )));
    }
    Ok(cnt as usize)
}

/// Validates `metas` for a receive of `posted` bytes from a pool of `pool_len` bytes and leaves the
/// copy plan in `runs` (sorted by destination, adjacent fragments merged). The fragments must tile
/// `[0, total)` exactly: an overlap or a hole would leave stale bytes in the destination. Returns
/// the message size, `total`.
pub fn plan(metas: &[LoadMeta], posted: usize, pool_len: u64, runs: &mut Vec<Run>) -> Result<usize> {
    check_count(metas.len() as u64)?;
    runs.clear();
    let mut total = 0u64;
    for (i, m) in metas.iter().enumerate() {
        let len = m.len as u64;
        let src_end = m.src_off as u64 + len;
        if src_end > pool_len {
            return Err(bad_fragment(i, m, format!("its source lies outside the {pool_len}-byte bounce pool")));
        }
        match m.dst_off.checked_add(len) {
            Some(end) if end <= posted as u64 => {}
            Some(_) => {
                return Err(bad_fragment(i, m, format!("its destination exceeds the posted {posted}-byte receive")));
            }
            None => return Err(bad_fragment(i, m, "its destination offset overflows".into())),
        }
        total += len;
        if len > 0 {
            runs.push(Run { src: m.src_off as u64, dst: m.dst_off, len });
        }
    }
    if total > posted as u64 {
        return Err(Error::backend(format!(
            "net plugin delivered {total} bytes into a {posted}-byte receive (fragments overlap)"
        )));
    }
    runs.sort_unstable_by_key(|r| r.dst);
    let mut merged = 0usize;
    let mut covered = 0u64;
    for j in 0..runs.len() {
        let r = runs[j];
        if r.dst != covered {
            let what = if r.dst < covered { "overlap" } else { "leave a hole" };
            return Err(Error::backend(format!(
                "net plugin fragments {what} at byte {} of a {total}-byte message",
                r.dst.min(covered)
            )));
        }
        covered += r.len;
        match merged.checked_sub(1).map(|k| &mut runs[k]) {
            Some(prev) if prev.src + prev.len == r.src => prev.len += r.len,
            _ => {
                runs[merged] = r;
                merged += 1;
            }
        }
    }
    runs.truncate(merged);
    Ok(total as usize)
}

fn bad_fragment(i: usize, m: &LoadMeta, why: String) -> Error {
    Error::backend(format!(
        "net plugin fragment {i} (src_off {}, len {}, dst_off {}) is invalid: {why}",
        m.src_off, m.len, m.dst_off
    ))
}

/// Copies every run from the pool into the destination.
///
/// # Safety
/// `runs` came from [`plan`] for this receive: `[pool, pool + pool_len)` and `[dst, dst + posted)`
/// are readable / writable host memory that nothing else touches meanwhile, and do not overlap.
pub unsafe fn copy_runs(pool: *const u8, dst: *mut u8, runs: &[Run]) {
    for r in runs {
        // SAFETY: bounds checked by `plan`, validity by the caller.
        unsafe { std::ptr::copy_nonoverlapping(pool.add(r.src as usize), dst.add(r.dst as usize), r.len as usize) };
    }
}

/// Copies every run from the pool into the destination pieces (message byte `p.at` on goes to
/// `p.addr`), a run that crosses pieces cut where they end.
///
/// # Safety
/// `runs` came from [`plan`] for this receive, posted for the pieces' total; the pieces tile
/// `[0, total)` in order (`DstPiece`); the pool is readable and every piece writable host memory
/// nothing else touches meanwhile, none overlapping another or the pool.
pub unsafe fn copy_runs_to_pieces(pool: *const u8, pieces: &[DstPiece], runs: &[Run]) {
    for r in runs {
        let mut k = pieces.partition_point(|p| p.at <= r.dst) - 1;
        let mut done = 0u64;
        while done < r.len {
            let p = pieces[k];
            let into = r.dst + done - p.at;
            let n = (p.len - into).min(r.len - done);
            // SAFETY: bounds checked by `plan` and the pieces' tiling, validity by the caller.
            unsafe {
                std::ptr::copy_nonoverlapping(pool.add((r.src + done) as usize), (p.addr + into) as *mut u8, n as usize)
            };
            done += n;
            k += 1;
        }
    }
}

/// The pieces of a vectored receive (`(addr, len)`, in message order), as `DstPiece`s.
pub fn pieces(segs: impl Iterator<Item = (usize, usize)>) -> Vec<DstPiece> {
    let mut at = 0u64;
    segs.map(|(addr, len)| {
        let p = DstPiece { at, addr: addr as u64, len: len as u64 };
        at += len as u64;
        p
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(src_off: u32, len: u32, dst_off: u64) -> LoadMeta {
        LoadMeta { src_off, len, dst_off }
    }

    #[test]
    fn shuffled_fragments_merge_and_gather_exactly() {
        // Pool: page 3 holds message bytes 0..4096, page 1 holds 4096..8192, page 2 holds 8192..8200.
        let metas = [m(4096, 4096, 4096), m(8192, 8, 8192), m(12288, 4000, 0), m(16288, 96, 4000)];
        let mut runs = Vec::new();
        assert_eq!(plan(&metas, 9000, 1 << 20, &mut runs).unwrap(), 8200);
        // 12288..16384 covers dst 0..4096 as one run; 4096..8200 from 4096.. is src-contiguous too.
        assert_eq!(runs, vec![Run { src: 12288, dst: 0, len: 4096 }, Run { src: 4096, dst: 4096, len: 4104 }]);

        let pool: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut dst = vec![0xEEu8; 9000];
        // SAFETY: plan checked every run against both buffers.
        unsafe { copy_runs(pool.as_ptr(), dst.as_mut_ptr(), &runs) };
        assert_eq!(&dst[..4096], &pool[12288..16384]);
        assert_eq!(&dst[4096..8200], &pool[4096..8200]);
        assert!(dst[8200..].iter().all(|b| *b == 0xEE), "bytes past the message untouched");
    }

    #[test]
    fn empty_and_zero_length_fragments() {
        let mut runs = vec![Run { src: 1, dst: 1, len: 1 }];
        assert_eq!(plan(&[], 0, MAX_POOL_LEN, &mut runs).unwrap(), 0);
        assert!(runs.is_empty());
        assert_eq!(plan(&[m(0, 0, 0), m(5, 3, 0)], 3, 8, &mut runs).unwrap(), 3);
        assert_eq!(runs, vec![Run { src: 5, dst: 0, len: 3 }]);
    }

    fn plan_err(metas: &[LoadMeta], posted: usize, pool: u64) -> String {
        plan(metas, posted, pool, &mut Vec::new()).unwrap_err().to_string()
    }

    #[test]
    fn refuses_out_of_bounds_overflow_overlap_holes_and_oversize() {
        let e = plan_err(&[m(0, 4096, 0), m(4096, 4096, 4097)], 8192, 1 << 20);
        assert!(e.contains("fragment 1") && e.contains("exceeds the posted 8192-byte"), "{e}");
        let e = plan_err(&[m(0, 16, u64::MAX - 3)], 100, 1 << 20);
        assert!(e.contains("overflows"), "{e}");
        let e = plan_err(&[m(u32::MAX, 2, 0)], 100, MAX_POOL_LEN);
        assert!(e.contains("outside the 4294967296-byte bounce pool"), "{e}");
        let e = plan_err(&[m(1000, 100, 0)], 100, 1050);
        assert!(e.contains("outside"), "{e}");
        let e = plan_err(&[m(0, 60, 0), m(100, 60, 40)], 120, 1 << 20);
        assert!(e.contains("overlap at byte 40"), "{e}");
        let e = plan_err(&[m(0, 60, 0), m(100, 30, 70)], 120, 1 << 20);
        assert!(e.contains("hole at byte 60"), "{e}");
        let e = plan_err(&[m(0, 40, 10), m(100, 30, 60)], 120, 1 << 20);
        assert!(e.contains("hole at byte 0"), "{e}");
        let e = plan_err(&[m(0, 80, 0), m(100, 80, 0)], 100, 1 << 20);
        assert!(e.contains("160 bytes into a 100-byte receive"), "{e}");
    }

    #[test]
    fn fragment_counts_are_bounded() {
        assert_eq!(check_count(2048).unwrap(), 2048);
        assert!(check_count(2049).unwrap_err().to_string().contains("2049 fragments"));
        assert!(check_count(u64::MAX).is_err());
        let many = vec![m(0, 0, 0); 2049];
        assert!(plan_err(&many, 0, 1).contains("2049"));
    }
}
