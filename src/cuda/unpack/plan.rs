//! Host side of the unpack: turns one receive's fragment list into copy tiles for the kernel.
//!
//! The list comes from the plugin and is trusted for nothing: every record is checked against the
//! destination and the bounce pool before any tile is emitted, because the kernel would otherwise
//! write wherever a bad `dst_off` points. Records that continue each other in both source and
//! destination are merged first (a page split across two cmsgs, a run of consecutive pages), so
//! the kernel sees fewer, longer copies; each run is then cut into tiles of at most [`TILE_BYTES`],
//! the unit one warp copies.

use crate::error::{Error, Result};
use crate::ncclnet::{LoadMeta, UNPACK_MAX_SLICE_PAGES};

/// Most bytes one tile (one warp) copies. One 4 KiB page per warp: 32 lanes x 8 words x 16 bytes.
pub const TILE_BYTES: u64 = 4096;

/// Most fragments one receive may report; the plugin's own per-request limit.
pub const MAX_FRAGMENTS: usize = UNPACK_MAX_SLICE_PAGES;

/// Where one receive's bytes come from and go to. All four values are device addresses and byte
/// counts in the unpacking device's address space; nothing here is dereferenced on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveLayout {
    /// Base of the bounce pool the fragments' `src_off` count from (`bounce_buf`).
    pub pool: u64,
    /// Bytes of the pool that may be read.
    pub pool_len: u64,
    /// Where byte 0 of the receive goes (`dst_off` counts from here).
    pub dst: u64,
    /// Bytes writable at `dst`.
    pub dst_len: u64,
}

impl ReceiveLayout {
    fn check(&self) -> Result<()> {
        if self.pool == 0 || self.dst == 0 {
            return Err(Error::invalid("unpack: null bounce pool or destination address"));
        }
        let limit = 1u64 << ADDRESS_BITS;
        if self.pool.checked_add(self.pool_len).is_none_or(|end| end > limit) {
            return Err(Error::invalid(format!(
                "unpack: bounce pool {:#x} + {} bytes overflows the {ADDRESS_BITS}-bit device address space",
                self.pool, self.pool_len
            )));
        }
        if self.dst.checked_add(self.dst_len).is_none_or(|end| end > limit) {
            return Err(Error::invalid(format!(
                "unpack: destination {:#x} + {} bytes overflows the {ADDRESS_BITS}-bit device address space",
                self.dst, self.dst_len
            )));
        }
        Ok(())
    }
}

/// One destination piece of a receive whose bytes go to several places (a vectored receive): the
/// message's bytes `[at, at + len)` belong at `addr`. A receive's pieces are listed in message
/// order, each starting where the one before it ends, from 0 to the receive's `dst_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DstPiece {
    pub at: u64,
    pub addr: u64,
    pub len: u64,
}

/// Checks that `pieces` tile `[0, dst_len)` in order, every one non-empty and addressable.
fn check_pieces(pieces: &[DstPiece], dst_len: u64) -> Result<()> {
    let mut at = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        if p.at != at || p.len == 0 || p.addr == 0 || !addressable(p.addr, p.len) {
            return Err(Error::invalid(format!(
                "unpack: destination piece {i} ({:#x}+{} at message byte {}) does not continue the pieces before it \
                 at byte {at}, is empty or lies outside the device address space",
                p.addr, p.len, p.at
            )));
        }
        at += p.len;
    }
    if at != dst_len {
        return Err(Error::invalid(format!("unpack: destination pieces hold {at} bytes, not the receive's {dst_len}")));
    }
    Ok(())
}

/// Device addresses must lie below 2^52 (4 PiB; x86-64 and Arm GPU address spaces use 47 to 49
/// bits) so that a tile's length fits in the top bits of its source address.
pub const ADDRESS_BITS: u32 = 52;
const ADDRESS_MASK: u64 = (1 << ADDRESS_BITS) - 1;

/// One copy of 1 to [`TILE_BYTES`] bytes, as the kernel reads it (`struct Tile` in kernel.cu):
/// the source address with `len - 1` in its top 12 bits, and the destination address. Sixteen
/// bytes, so one vector load fetches a tile and 254 of them fit in a 4 KiB parameter block after its 32-byte header.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tile {
    src_and_len: u64,
    dst: u64,
}

const _: () = assert!(size_of::<Tile>() == 16 && align_of::<Tile>() == 16);
const _: () = assert!(TILE_BYTES - 1 < 1 << (64 - ADDRESS_BITS));

impl Tile {
    /// `src` and `dst` below 2^[`ADDRESS_BITS`], `len` in 1..=[`TILE_BYTES`] (checked by the planner).
    pub fn new(src: u64, dst: u64, len: u32) -> Tile {
        debug_assert!(src <= ADDRESS_MASK && len >= 1 && u64::from(len) <= TILE_BYTES);
        Tile { src_and_len: src | (u64::from(len) - 1) << ADDRESS_BITS, dst }
    }

    pub fn src(&self) -> u64 {
        self.src_and_len & ADDRESS_MASK
    }

    pub fn dst(&self) -> u64 {
        self.dst
    }

    pub fn bytes(&self) -> u32 {
        (self.src_and_len >> ADDRESS_BITS) as u32 + 1
    }
}

/// What planning one receive produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Bytes the receive's fragments carry.
    pub bytes: u64,
    /// Copies left after merging contiguous fragments.
    pub runs: usize,
    /// Tiles appended.
    pub tiles: usize,
}

/// Why a receive could not be planned.
#[derive(Debug)]
pub enum PlanError {
    /// The fragment list or layout is invalid; the receive must not be unpacked.
    Invalid(Error),
    /// The tiles do not fit in the space left; `needed` is a lower bound on the tiles required.
    NoRoom { needed: usize },
}

/// Checks `metas` against `layout`, merges contiguous fragments and appends the tiles to
/// `tiles[*used..]`, advancing `*used`. On any error nothing is appended and `*used` is unchanged.
pub fn plan_receive(
    layout: &ReceiveLayout,
    metas: &[LoadMeta],
    tiles: &mut [Tile],
    used: &mut usize,
) -> std::result::Result<PlanStats, PlanError> {
    plan_receive_pieces(layout, &[], metas, tiles, used)
}

/// [`plan_receive`] for a receive whose destination is `pieces` (none: `layout.dst`): the fragment
/// list composed with the piece list, so every tile copies from the pool straight into the piece
/// its bytes belong to, a run that crosses pieces cut where they end. `layout.dst_len` is the
/// pieces' total; `layout.dst` is not written.
pub fn plan_receive_pieces(
    layout: &ReceiveLayout,
    pieces: &[DstPiece],
    metas: &[LoadMeta],
    tiles: &mut [Tile],
    used: &mut usize,
) -> std::result::Result<PlanStats, PlanError> {
    layout.check().map_err(PlanError::Invalid)?;
    if !pieces.is_empty() {
        check_pieces(pieces, layout.dst_len).map_err(PlanError::Invalid)?;
    }
    if metas.len() > MAX_FRAGMENTS {
        return Err(PlanError::Invalid(Error::invalid(format!(
            "unpack: receive reports {} fragments, more than the limit of {MAX_FRAGMENTS}",
            metas.len()
        ))));
    }
    let start = *used;
    let mut out = TileWriter { tiles, used: start, pieces };
    let mut stats = PlanStats::default();
    // The run being extended; `run.len == 0` means none yet. Kept in locals rather than an
    // Option so the per-fragment loop stays branch-light (this is on every receive's latency).
    let mut run = Run { src_off: 0, dst_off: 0, len: 0 };
    for (index, meta) in metas.iter().enumerate() {
        let len = u64::from(meta.len);
        if len == 0 {
            continue;
        }
        let src_off = u64::from(meta.src_off);
        // src_off and len are both 32-bit, so their sum cannot overflow u64; dst_off is checked
        // before the subtraction.
        if src_off + len > layout.pool_len || meta.dst_off > layout.dst_len || len > layout.dst_len - meta.dst_off {
            return Err(PlanError::Invalid(fragment_error(layout, index, meta)));
        }
        stats.bytes += len;
        if run.len != 0 && run.src_off + run.len == src_off && run.dst_off + run.len == meta.dst_off {
            run.len += len;
            continue;
        }
        if run.len != 0 {
            stats.runs += 1;
            if let Err(needed) = out.push_run(layout, &run) {
                return Err(no_room(start, needed, &out));
            }
        }
        run = Run { src_off, dst_off: meta.dst_off, len };
    }
    if run.len != 0 {
        stats.runs += 1;
        if let Err(needed) = out.push_run(layout, &run) {
            return Err(no_room(start, needed, &out));
        }
    }
    stats.tiles = out.used - start;
    *used = out.used;
    Ok(stats)
}

#[cold]
fn no_room(start: usize, needed_now: usize, out: &TileWriter<'_>) -> PlanError {
    PlanError::NoRoom { needed: out.used - start + needed_now }
}

/// A validated, non-empty copy: offsets relative to the pool and the destination.
#[derive(Clone, Copy, Debug)]
struct Run {
    src_off: u64,
    dst_off: u64,
    len: u64,
}

/// Why a fragment failed the bounds checks of `plan_receive`.
#[cold]
fn fragment_error(layout: &ReceiveLayout, index: usize, meta: &LoadMeta) -> Error {
    let (src_off, len) = (u64::from(meta.src_off), u64::from(meta.len));
    if src_off + len > layout.pool_len {
        Error::invalid(format!(
            "unpack: fragment {index} reads pool bytes {src_off}..{} beyond the pool's {} bytes",
            src_off + len,
            layout.pool_len
        ))
    } else {
        Error::invalid(format!(
            "unpack: fragment {index} writes destination bytes {}+{len} beyond the destination's {} bytes",
            meta.dst_off, layout.dst_len
        ))
    }
}

/// The first tile of a run ends on a 16-byte boundary of the destination, so that every later tile
/// starts aligned and only the run's two ends need byte copies.
fn first_tile_len(dst: u64, len: u64) -> u64 {
    (TILE_BYTES - (dst & 15)).min(len)
}

/// Whether `[addr, addr + len)` lies below 2^[`ADDRESS_BITS`], where a tile can name it.
pub fn addressable(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|end| end <= 1 << ADDRESS_BITS)
}

/// How many tiles [`cut_run`] cuts a copy of `len` bytes to `dst` into (none for an empty one).
#[inline]
fn tiles_needed(dst: u64, len: u64) -> usize {
    if len == 0 {
        return 0;
    }
    1 + (len - first_tile_len(dst, len)).div_ceil(TILE_BYTES) as usize
}

/// Cuts the first tiles of a copy of `len` bytes from `src` to `dst` into `out`, as many as it
/// holds or the copy has ([`tiles_needed`]); returns how many it wrote and the bytes they cover, so
/// that the rest, cut from there on, gives the same tiles. The first tile ends on a 16-byte
/// boundary of the destination, so that every later tile starts aligned and only the copy's two
/// ends need byte copies. A plain loop over a slice: the planner and the tile copier cut thousands
/// of tiles per call on a caller's path.
#[inline]
pub fn cut_run(out: &mut [Tile], src: u64, dst: u64, len: u64) -> (usize, u64) {
    debug_assert!(addressable(src, len) && addressable(dst, len));
    let Some((first, rest)) = out.split_first_mut().filter(|_| len > 0) else { return (0, 0) };
    let mut done = first_tile_len(dst, len);
    *first = Tile::new(src, dst, done as u32);
    let mut written = 1;
    for tile in rest {
        if done == len {
            break;
        }
        let n = TILE_BYTES.min(len - done);
        *tile = Tile::new(src + done, dst + done, n as u32);
        done += n;
        written += 1;
    }
    (written, done)
}

/// The tiles of one copy of `len` bytes from `src` to `dst`, one at a time: the tests' reference
/// for [`cut_run`]. Both ranges must be [`addressable`]; a zero-length copy has no tiles.
#[cfg(test)]
pub fn run_tiles(src: u64, dst: u64, len: u64) -> impl Iterator<Item = Tile> {
    debug_assert!(addressable(src, len) && addressable(dst, len));
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let n = if done == 0 { first_tile_len(dst, len) } else { TILE_BYTES.min(len - done) };
        let tile = Tile::new(src + done, dst + done, n as u32);
        done += n;
        Some(tile)
    })
}

struct TileWriter<'a> {
    tiles: &'a mut [Tile],
    used: usize,
    /// The destination's pieces; empty for a contiguous destination.
    pieces: &'a [DstPiece],
}

impl TileWriter<'_> {
    /// Cuts a run into tiles ([`cut_run`]), in each destination piece it covers. Err carries how
    /// many tiles the run needs.
    #[inline]
    fn push_run(&mut self, layout: &ReceiveLayout, run: &Run) -> std::result::Result<(), usize> {
        if self.pieces.is_empty() {
            return self.push_copy(layout.pool + run.src_off, layout.dst + run.dst_off, run.len);
        }
        // The piece holding the run's first byte: the last one starting at or before it.
        let mut k = self.pieces.partition_point(|p| p.at <= run.dst_off) - 1;
        let (mut done, mut needed) = (0u64, 0usize);
        while done < run.len {
            let p = self.pieces[k];
            let into = run.dst_off + done - p.at;
            let n = (p.len - into).min(run.len - done);
            if needed == 0 {
                if let Err(more) = self.push_copy(layout.pool + run.src_off + done, p.addr + into, n) {
                    needed = more;
                }
            } else {
                needed += tiles_needed(p.addr + into, n);
            }
            done += n;
            k += 1;
        }
        if needed == 0 { Ok(()) } else { Err(needed) }
    }

    #[inline]
    fn push_copy(&mut self, src: u64, dst: u64, len: u64) -> std::result::Result<(), usize> {
        let needed = tiles_needed(dst, len);
        let Some(out) = self.tiles.get_mut(self.used..self.used + needed) else { return Err(needed) };
        cut_run(out, src, dst, len);
        self.used += needed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: u64 = 0x7f00_0000_0000;
    const POOL_LEN: u64 = 1 << 24;
    const DST: u64 = 0x7e00_0000_0000;

    fn meta(src_off: u32, len: u32, dst_off: u64) -> LoadMeta {
        LoadMeta { src_off, len, dst_off }
    }

    fn layout(dst_len: u64) -> ReceiveLayout {
        ReceiveLayout { pool: POOL, pool_len: POOL_LEN, dst: DST, dst_len }
    }

    fn plan(layout: &ReceiveLayout, metas: &[LoadMeta], room: usize) -> std::result::Result<Vec<Tile>, PlanError> {
        let mut tiles = vec![Tile::default(); room];
        let mut used = 0;
        plan_receive(layout, metas, &mut tiles, &mut used)?;
        tiles.truncate(used);
        Ok(tiles)
    }

    fn invalid_message(result: std::result::Result<Vec<Tile>, PlanError>) -> String {
        match result {
            Err(PlanError::Invalid(e)) => e.to_string(),
            other => panic!("expected an invalid-input error, got {other:?}"),
        }
    }

    /// Byte-exact CPU model: applies tiles or fragments to a pool and destination held in memory.
    fn apply_tiles(pool: &[u8], dst: &mut [u8], tiles: &[Tile]) {
        for t in tiles {
            let s = (t.src() - POOL) as usize;
            let d = (t.dst() - DST) as usize;
            dst[d..d + t.bytes() as usize].copy_from_slice(&pool[s..s + t.bytes() as usize]);
        }
    }

    fn apply_metas(pool: &[u8], dst: &mut [u8], metas: &[LoadMeta]) {
        for m in metas {
            let (s, d, n) = (m.src_off as usize, m.dst_off as usize, m.len as usize);
            dst[d..d + n].copy_from_slice(&pool[s..s + n]);
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn tiles_round_trip_their_fields() {
        let top = (1 << ADDRESS_BITS) - 1;
        for (src, dst, len) in [(0, 0, 1), (top, top, 4096), (POOL + 3, DST + 5, 4095), (1, u64::MAX, 17)] {
            let t = Tile::new(src, dst, len);
            assert_eq!((t.src(), t.dst(), t.bytes()), (src, dst, len));
        }
    }

    #[test]
    fn adjacent_fragments_merge_and_others_do_not() {
        let l = layout(1 << 20);
        // Two halves of one page, contiguous in both source and destination: one run.
        let tiles = plan(&l, &[meta(8192, 2048, 0), meta(10240, 2048, 2048)], 16).unwrap();
        assert_eq!(tiles, vec![Tile::new(POOL + 8192, DST, 4096)]);
        // Contiguous source, gap in destination: two runs.
        let tiles = plan(&l, &[meta(0, 100, 0), meta(100, 100, 4096)], 16).unwrap();
        assert_eq!(tiles.len(), 2);
        // Contiguous destination, source elsewhere: two runs.
        let tiles = plan(&l, &[meta(0, 100, 0), meta(500, 100, 100)], 16).unwrap();
        assert_eq!(tiles.len(), 2);
        assert_eq!((tiles[1].src(), tiles[1].dst(), tiles[1].bytes()), (POOL + 500, DST + 100, 100));
    }

    #[test]
    fn long_runs_are_cut_into_tiles_aligned_after_the_first() {
        let mut l = layout(1 << 20);
        l.dst = DST + 3;
        let metas: Vec<LoadMeta> = (0..4).map(|i| meta(i * 4096 + 5, 4096, u64::from(i) * 4096)).collect();
        let tiles = plan(&l, &metas, 16).unwrap();
        assert_eq!(tiles.iter().map(|t| u64::from(t.bytes())).sum::<u64>(), 4 * 4096);
        assert_eq!(tiles[0].bytes(), 4096 - 3);
        assert_eq!(tiles[0].dst(), DST + 3);
        for pair in tiles.windows(2) {
            assert_eq!(pair[0].dst() + u64::from(pair[0].bytes()), pair[1].dst());
            assert_eq!(pair[0].src() + u64::from(pair[0].bytes()), pair[1].src());
        }
        for t in &tiles[1..] {
            assert_eq!(t.dst() % 16, 0, "{t:?}");
            assert!(u64::from(t.bytes()) <= TILE_BYTES);
        }
        assert_eq!(tiles.len(), 5);
    }

    #[test]
    fn run_tiles_cut_a_copy_as_the_planner_cuts_a_run() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..500 {
            let len = 1 + rng.below(20_000);
            let (src, dst) = (POOL + rng.below(64), DST + rng.below(64));
            let tiles: Vec<Tile> = run_tiles(src, dst, len).collect();
            assert_eq!(tiles_needed(dst, len), tiles.len(), "{len} bytes to {dst:#x}");
            let mut cut = vec![Tile::default(); tiles.len() + 2];
            assert_eq!(cut_run(&mut cut, src, dst, len), (tiles.len(), len), "a slice with room to spare");
            assert_eq!(cut[..tiles.len()], tiles[..], "{len} bytes from {src:#x} to {dst:#x}, cut into a slice");
            // Cut in two at any tile: the second part, cut from where the first ended, gives the rest.
            let at = rng.below(tiles.len() as u64) as usize;
            let mut parts = vec![Tile::default(); tiles.len()];
            let (head, tail) = parts.split_at_mut(at);
            let (n, bytes) = cut_run(head, src, dst, len);
            assert_eq!(n, at);
            assert_eq!(cut_run(tail, src + bytes, dst + bytes, len - bytes), (tiles.len() - at, len - bytes));
            assert_eq!(parts, tiles, "{len} bytes cut in two after tile {at}");
            let mut l = layout(len + 64);
            l.dst = dst;
            let planned = plan(&l, &[meta((src - POOL) as u32, len as u32, 0)], 64).unwrap();
            assert_eq!(tiles, planned, "{len} bytes from {src:#x} to {dst:#x}");
            assert_eq!(tiles.iter().map(|t| u64::from(t.bytes())).sum::<u64>(), len);
        }
        assert_eq!(run_tiles(POOL, DST, 0).count(), 0);
        assert_eq!(tiles_needed(DST, 0), 0);
        assert_eq!(cut_run(&mut [Tile::default(); 2], POOL, DST, 0), (0, 0));
        assert!(addressable((1 << ADDRESS_BITS) - 16, 16));
        assert!(!addressable((1 << ADDRESS_BITS) - 16, 17));
        assert!(!addressable(u64::MAX, 2));
    }

    #[test]
    fn zero_length_fragments_are_skipped_and_empty_receives_plan_to_nothing() {
        let l = layout(4096);
        assert!(plan(&l, &[], 4).unwrap().is_empty());
        let tiles = plan(&l, &[meta(0, 0, 4096), meta(0, 16, 0)], 4).unwrap();
        assert_eq!(tiles.len(), 1);
    }

    #[test]
    fn fragments_outside_the_destination_or_pool_are_rejected() {
        let l = layout(8192);
        let msg = invalid_message(plan(&l, &[meta(0, 4096, 4097)], 8));
        assert!(msg.contains("fragment 0") && msg.contains("destination"), "{msg}");
        // Exactly at the end is fine; one byte more is not.
        assert!(plan(&l, &[meta(0, 4096, 4096)], 8).is_ok());
        let msg = invalid_message(plan(&l, &[meta(0, 16, 0), meta(0, 1, 8192)], 8));
        assert!(msg.contains("fragment 1"), "{msg}");
        // dst_off + len overflowing u64 must not wrap into range.
        let msg = invalid_message(plan(&l, &[meta(0, 16, u64::MAX - 7)], 8));
        assert!(msg.contains("destination"), "{msg}");
        let msg = invalid_message(plan(&l, &[meta((POOL_LEN - 8) as u32, 16, 0)], 8));
        assert!(msg.contains("pool"), "{msg}");
        let msg = invalid_message(plan(&l, &[meta(u32::MAX, u32::MAX, 0)], 8));
        assert!(msg.contains("pool"), "{msg}");
    }

    #[test]
    fn bad_layouts_and_too_many_fragments_are_rejected() {
        let mut l = layout(4096);
        l.dst = u64::MAX - 100;
        assert!(invalid_message(plan(&l, &[], 1)).contains("overflows"));
        // Ending exactly at 2^52 is fine; one byte further does not fit a tile.
        let mut l = layout(4096);
        l.dst = (1 << ADDRESS_BITS) - 4096;
        assert!(plan(&l, &[meta(0, 4096, 0)], 1).is_ok());
        l.dst_len = 4097;
        assert!(invalid_message(plan(&l, &[], 1)).contains("52-bit"));
        let mut l = layout(4096);
        l.pool = 1 << ADDRESS_BITS;
        assert!(invalid_message(plan(&l, &[], 1)).contains("52-bit"));
        let mut l = layout(4096);
        l.pool = 0;
        assert!(invalid_message(plan(&l, &[], 1)).contains("null"));
        let l = layout(1 << 30);
        let metas: Vec<LoadMeta> = (0..=MAX_FRAGMENTS as u64).map(|i| meta(0, 1, i * 2)).collect();
        assert!(invalid_message(plan(&l, &metas, 4096)).contains("2049 fragments"));
        assert!(plan(&l, &metas[..MAX_FRAGMENTS], 4096).is_ok());
    }

    #[test]
    fn an_error_appends_nothing() {
        let l = layout(1 << 20);
        let mut tiles = vec![Tile::default(); 8];
        let mut used = 3;
        let bad = [meta(0, 4096, 0), meta(0, 4096, 1 << 20)];
        assert!(matches!(plan_receive(&l, &bad, &mut tiles, &mut used), Err(PlanError::Invalid(_))));
        assert_eq!(used, 3);
        let big: Vec<LoadMeta> = (0..8).map(|i| meta(i * 8192, 4096, u64::from(i) * 8192)).collect();
        match plan_receive(&l, &big, &mut tiles, &mut used) {
            Err(PlanError::NoRoom { needed }) => assert!(needed > 5, "{needed}"),
            other => panic!("expected NoRoom, got {other:?}"),
        }
        assert_eq!(used, 3);
        let stats = plan_receive(&l, &big[..5], &mut tiles, &mut used).unwrap();
        assert_eq!((stats.tiles, stats.runs, stats.bytes, used), (5, 5, 5 * 4096, 8));
    }

    #[test]
    fn random_fragment_lists_plan_to_the_same_bytes_as_a_direct_gather() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pool: Vec<u8> = (0..1 << 16).map(|_| rng.next() as u8).collect();
        for round in 0..300 {
            let dst_len = 1 + rng.below(40_000);
            // Fragments tile the destination in order (as the plugin reports them), each taken
            // from a random pool offset, sometimes continuing the previous fragment's source.
            let mut metas = Vec::new();
            let mut at = 0;
            while at < dst_len {
                let len = (1 + rng.below(if round % 3 == 0 { 64 } else { 6000 })).min(dst_len - at);
                let src = match metas.last() {
                    Some(LoadMeta { src_off, len: prev, .. })
                        if rng.below(3) == 0 && u64::from(src_off + prev) + len <= pool.len() as u64 =>
                    {
                        u64::from(src_off + prev)
                    }
                    _ => rng.below(pool.len() as u64 - 6000),
                };
                metas.push(meta(src as u32, len as u32, at));
                at += len;
            }
            if round % 2 == 1 {
                // Arrival order is not destination order.
                for i in (1..metas.len()).rev() {
                    metas.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let mut l = layout(dst_len);
            l.pool_len = pool.len() as u64;
            l.dst = DST + rng.below(16);
            let room = metas.iter().map(|m| m.len as usize / 4096 + 2).sum();
            let tiles = plan(&l, &metas, room).unwrap();
            assert!(tiles.iter().all(|t| t.bytes() > 0 && u64::from(t.bytes()) <= TILE_BYTES));
            let offset = (l.dst - DST) as usize;
            let mut via_tiles = vec![0u8; offset + dst_len as usize];
            apply_tiles(&pool, &mut via_tiles, &tiles);
            let mut via_metas = vec![0u8; dst_len as usize];
            apply_metas(&pool, &mut via_metas, &metas);
            assert_eq!(&via_tiles[offset..], &via_metas[..], "round {round}");
        }
    }

    #[test]
    fn fragments_composed_with_destination_pieces_land_in_the_pieces() {
        let mut rng = Rng(0x9e37_79b9);
        for round in 0..50 {
            // A message of shuffled fragments of odd sizes (pages split at random points).
            let total = 1 + rng.below(64 * 1024) as usize;
            let mut metas = Vec::new();
            let mut at = 0u64;
            while (at as usize) < total {
                let len = (1 + rng.below(5000)).min(total as u64 - at);
                metas.push((at, len));
                at += len;
            }
            let mut order: Vec<usize> = (0..metas.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut src_at = 0u32;
            let metas: Vec<LoadMeta> = order
                .iter()
                .map(|&k| {
                    let (dst_off, len) = metas[k];
                    let m = meta(src_at + 7, len as u32, dst_off);
                    src_at += len as u32 + 13;
                    m
                })
                .collect();
            let pool: Vec<u8> = (0..src_at as usize + 64).map(|i| (i * 131 + round) as u8).collect();
            // Destination pieces of 1..3000 bytes at shuffled, odd places of a destination buffer.
            let mut lens = Vec::new();
            let mut left = total as u64;
            while left > 0 {
                let len = (1 + rng.below(3000)).min(left);
                lens.push(len);
                left -= len;
            }
            let stride = 3000 + 16;
            let mut slots: Vec<u64> = (0..lens.len() as u64).collect();
            for i in (1..slots.len()).rev() {
                slots.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut pieces = Vec::new();
            let mut at = 0;
            for (k, &len) in lens.iter().enumerate() {
                pieces.push(DstPiece { at, addr: DST + slots[k] * stride + rng.below(16), len });
                at += len;
            }
            let layout = ReceiveLayout { pool: POOL, pool_len: pool.len() as u64, dst: DST, dst_len: total as u64 };
            let mut tiles = vec![Tile::default(); 4096];
            let mut used = 0;
            let stats = plan_receive_pieces(&layout, &pieces, &metas, &mut tiles, &mut used).expect("plans");
            assert_eq!(stats.bytes, total as u64);
            let mut dst = vec![0u8; lens.len() * stride as usize];
            apply_tiles(&pool, &mut dst, &tiles[..used]);
            let mut message = vec![0u8; total];
            apply_metas(&pool, &mut message, &metas);
            for p in &pieces {
                let d = (p.addr - DST) as usize;
                let m = p.at as usize;
                assert_eq!(&dst[d..d + p.len as usize], &message[m..m + p.len as usize], "round {round}");
            }
            assert!(tiles[..used].iter().all(|t| t.bytes() as u64 <= TILE_BYTES));
        }
    }

    #[test]
    fn destination_pieces_must_tile_the_receive() {
        let layout = layout(100);
        let mut tiles = vec![Tile::default(); 16];
        let gap = [DstPiece { at: 0, addr: DST, len: 50 }, DstPiece { at: 60, addr: DST + 64, len: 40 }];
        let short = [DstPiece { at: 0, addr: DST, len: 50 }];
        for pieces in [&gap[..], &short[..]] {
            let mut used = 0;
            match plan_receive_pieces(&layout, pieces, &[meta(0, 100, 0)], &mut tiles, &mut used) {
                Err(PlanError::Invalid(e)) => assert!(e.to_string().contains("piece"), "{e}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(used, 0);
        }
    }
}
