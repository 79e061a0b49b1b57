//! One-sided calls given as runs of pieces (`Connection::write_pieces`, `uccl_tcpx_write_pieces`),
//! the form the NIXL backend posts block tables in: scattered blocks of two local regions to and
//! from random blocks of the peer land where they should on the network and the same-host paths;
//! bad pieces fail the call whole; and a post allocates per piece no more than the engine's own
//! segment lists and the wire need, where the item form copies a 88-byte item per piece first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::null_mut;

use uccl_tcpx::ffi::{
    uccl_engine_last_error, uccl_tcpx_piece_t, uccl_tcpx_read_pieces, uccl_tcpx_run_t, uccl_tcpx_write_pieces,
};
use uccl_tcpx::{FifoItem, OneSided, Piece, PieceRun, UcclStatus};

mod common;
use common::engine::Region;
use common::{Pair, Rng, pattern, wait};

/// Counts the bytes this thread asks the allocator for, so that a test sees what one call on its
/// own thread allocated, whatever the engine's threads and other tests do meanwhile.
struct Counting;

thread_local! {
    static ASKED: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    let _ = ASKED.try_with(|a| a.set(a.get() + bytes as u64));
}

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes this thread allocated while `f` ran, and its result.
fn allocated<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = ASKED.with(Cell::get);
    let r = f();
    (ASKED.with(Cell::get) - before, r)
}

const BLOCK: usize = 4096;
const BLOCKS: usize = 256;

/// A block table: `per` random distinct blocks of each of `locals` into random distinct blocks of
/// `remote`, as runs (one per local region) and pieces.
fn table(rng: &mut Rng, locals: &[&Region], remote: &Region, per: usize) -> (Vec<PieceRun>, Vec<Piece>) {
    let mut dst: Vec<usize> = (0..BLOCKS).collect();
    rng.shuffle(&mut dst);
    let mut runs = Vec::new();
    let mut pieces = Vec::new();
    for (k, local) in locals.iter().enumerate() {
        let mut src: Vec<usize> = (0..BLOCKS).collect();
        rng.shuffle(&mut src);
        for j in 0..per {
            let (s, d) = (src[j], dst[k * per + j]);
            pieces.push(Piece {
                local: (local.addr() + s * BLOCK) as u64,
                remote: (remote.addr() + d * BLOCK) as u64,
                len: BLOCK as u64,
            });
        }
        runs.push(PieceRun { mr: local.mr, remote: remote.fifo, pieces: per });
    }
    (runs, pieces)
}

/// The bytes `pieces` name, each piece's local or remote range, concatenated.
fn gather(regions: &[&Region], pieces: &[Piece], remote: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        let addr = if remote { p.remote } else { p.local };
        let addr = addr as usize;
        let r = regions.iter().find(|r| addr >= r.addr() && addr < r.addr() + r.bytes.len()).unwrap();
        let at = addr - r.addr();
        out.extend_from_slice(&r.bytes[at..at + p.len as usize]);
    }
    out
}

fn write_then_read_back(p: &Pair, stream: &str) {
    let mut rng = Rng::new(stream);
    let a0 = Region::new(&p.a, pattern(BLOCKS * BLOCK, 1));
    let a1 = Region::new(&p.a, pattern(BLOCKS * BLOCK, 2));
    let b = Region::new(&p.b, vec![0u8; BLOCKS * BLOCK]);
    // 100 blocks of each region: two vector requests on the network path.
    let (runs, pieces) = table(&mut rng, &[&a0, &a1], &b, 100);
    wait(&p.ab, p.ab.write_pieces(&runs, &pieces).unwrap()).unwrap();
    assert_eq!(gather(&[&b], &pieces, true), gather(&[&a0, &a1], &pieces, false), "{stream}: written bytes");
    // Read them back into fresh regions, as a block table of their own; a short run (three pieces)
    // goes item by item.
    let c0 = Region::new(&p.a, vec![0u8; BLOCKS * BLOCK]);
    let c1 = Region::new(&p.a, vec![0u8; BLOCKS * BLOCK]);
    let (mut runs, pieces) = table(&mut rng, &[&c0, &c1], &b, 100);
    let short = pieces.len() - 3;
    runs[1].pieces -= 3;
    runs.push(PieceRun { mr: c1.mr, remote: b.fifo, pieces: 3 });
    let mut shuffled = pieces.clone();
    shuffled[short..].reverse();
    wait(&p.ab, p.ab.read_pieces(&runs, &shuffled).unwrap()).unwrap();
    assert_eq!(gather(&[&c0, &c1], &shuffled, false), gather(&[&b], &shuffled, true), "{stream}: read bytes");
}

#[test]
fn block_tables_land_on_the_network_path() {
    write_then_read_back(&common::pair(common::loopback()), "pieces-network");
}

#[test]
fn block_tables_land_on_the_same_host_path() {
    write_then_read_back(&common::pair(common::same_host()), "pieces-same-host");
}

/// A bad call: what is wrong, its runs and pieces, the status and a part of the message it gets.
type Case = (&'static str, Vec<PieceRun>, Vec<Piece>, UcclStatus, &'static str);

/// Bad pieces and runs fail the call before anything is sent: the target's bytes stay as they were.
#[test]
fn bad_pieces_fail_the_call_whole() {
    let p = common::pair(common::loopback());
    let a = Region::new(&p.a, pattern(BLOCKS * BLOCK, 3));
    let b = Region::new(&p.b, vec![0u8; BLOCKS * BLOCK]);
    let good = |k: u64| Piece {
        local: a.addr() as u64 + k * BLOCK as u64,
        remote: b.addr() as u64 + k * BLOCK as u64,
        len: BLOCK as u64,
    };
    let run = |n: usize| PieceRun { mr: a.mr, remote: b.fifo, pieces: n };
    let end = BLOCKS as u64 * BLOCK as u64;
    let mut narrowed = b.fifo;
    narrowed.size = BLOCK as u32;
    let cases: Vec<Case> = vec![
        (
            "local past the region",
            vec![run(2)],
            vec![good(0), Piece { local: a.addr() as u64 + end - 8, ..good(1) }],
            UcclStatus::ErrInvalidParam,
            "piece 1: buffer",
        ),
        (
            "remote past the grant",
            vec![run(2)],
            vec![good(0), Piece { remote: b.addr() as u64 + end - 8, ..good(1) }],
            UcclStatus::ErrInvalidParam,
            "piece 1: remote range",
        ),
        (
            "remote before the grant",
            vec![run(1)],
            vec![Piece { remote: b.addr() as u64 - BLOCK as u64, ..good(0) }],
            UcclStatus::ErrInvalidParam,
            "remote range",
        ),
        (
            "outside a narrowed grant",
            vec![PieceRun { remote: narrowed, ..run(2) }],
            vec![good(0), good(1)],
            UcclStatus::ErrInvalidParam,
            "piece 1: remote range",
        ),
        (
            "an empty piece",
            vec![run(2)],
            vec![good(0), Piece { len: 0, ..good(1) }],
            UcclStatus::ErrInvalidParam,
            "size is 0",
        ),
        (
            "a NULL local address",
            vec![run(1)],
            vec![Piece { local: 0, ..good(0) }],
            UcclStatus::ErrInvalidParam,
            "NULL",
        ),
        (
            "a wrapping local range",
            vec![run(1)],
            vec![Piece { local: u64::MAX - 8, ..good(0) }],
            UcclStatus::ErrInvalidParam,
            "piece 0",
        ),
        (
            "counts that do not add up",
            vec![run(3)],
            vec![good(0), good(1)],
            UcclStatus::ErrInvalidParam,
            "do not add up",
        ),
        ("a run of no pieces", vec![run(0), run(1)], vec![good(0)], UcclStatus::ErrInvalidParam, "zero pieces"),
        ("no pieces at all", vec![], vec![], UcclStatus::ErrInvalidParam, "zero pieces"),
        (
            "an unknown region",
            vec![PieceRun { mr: a.mr + 99, ..run(1) }],
            vec![good(0)],
            UcclStatus::ErrNotFound,
            "not registered",
        ),
        (
            "a foreign capability",
            vec![PieceRun { remote: FifoItem::default(), ..run(1) }],
            vec![good(0)],
            UcclStatus::ErrInvalidParam,
            "run 0",
        ),
    ];
    for (what, runs, pieces, status, says) in cases {
        for write in [true, false] {
            let got = if write { p.ab.write_pieces(&runs, &pieces) } else { p.ab.read_pieces(&runs, &pieces) };
            let e = got.expect_err(what);
            assert_eq!(e.status(), status, "{what}: {e}");
            assert!(e.message().contains(says), "{what}: {e}");
        }
    }
    assert!(b.bytes.iter().all(|&x| x == 0), "a refused call wrote nothing");
    // The connection still works afterwards.
    wait(&p.ab, p.ab.write_pieces(&[run(2)], &[good(0), good(1)]).unwrap()).unwrap();
    assert_eq!(&b.bytes[..2 * BLOCK], &a.bytes[..2 * BLOCK]);
}

/// What a post allocates on the caller's thread grows with the pieces by no more than the
/// engine's own lists of them (this end's and the peer's segments, 16 bytes each) and what the copy
/// keeps per segment: 64 bytes a piece at most, where the item form (as its C call makes its items)
/// allocates an 88-byte item more. Between two engines of this process every step of a post runs
/// on the caller's thread, so the count is the same at every run.
#[test]
fn a_post_allocates_per_piece_only_the_lists_the_engine_keeps() {
    let p = common::pair(common::same_host());
    let a = Region::new(&p.a, pattern(4 << 20, 4));
    let b = Region::new(&p.b, vec![0u8; 4 << 20]);
    // The same 4 MiB as 512 and as 4096 pieces (within one request each), every other block so
    // that none merge: the same chunks and flows either way, only the piece count differs.
    let post = |n: usize| {
        let len = (2 << 20) / n as u64;
        let pieces: Vec<Piece> = (0..n as u64)
            .map(|k| Piece { local: a.addr() as u64 + 2 * k * len, remote: b.addr() as u64 + 2 * k * len, len })
            .collect();
        let run = [PieceRun { mr: a.mr, remote: b.fifo, pieces: n }];
        let (bytes, id) = allocated(|| p.ab.write_pieces(&run, &pieces).unwrap());
        wait(&p.ab, id).unwrap();
        // The item form as its C call makes it: the items first, then the call.
        let (item_bytes, id) = allocated(|| {
            let items: Vec<OneSided> = pieces
                .iter()
                .map(|q| OneSided {
                    mr: a.mr,
                    addr: q.local as usize,
                    len: q.len as usize,
                    remote: FifoItem { addr: q.remote, size: q.len as u32, ..b.fifo },
                })
                .collect();
            p.ab.write(&items).unwrap()
        });
        wait(&p.ab, id).unwrap();
        (bytes, item_bytes)
    };
    post(512); // warm: the connection's first post sets up what later ones reuse
    let (few, few_items) = post(512);
    let (many, many_items) = post(4096);
    let per_piece = many.saturating_sub(few) / (4096 - 512);
    let per_item = many_items.saturating_sub(few_items) / (4096 - 512);
    println!("allocated per piece: {per_piece} bytes; per item of the item form: {per_item}");
    assert!(per_piece <= 64, "a post allocated {per_piece} bytes a piece ({few} for 512, {many} for 4096)");
    assert!(per_item > per_piece, "the item form allocated {per_item} bytes an item, the pieces {per_piece}");
}

/// The C calls refuse NULL arrays, a NULL id, an empty call and a bad handle with a message.
#[test]
fn the_c_calls_check_their_arguments() {
    let last = || {
        let mut buf = vec![0u8; 512];
        let n = uccl_engine_last_error(buf.as_mut_ptr().cast(), buf.len());
        String::from_utf8_lossy(&buf[..n.min(buf.len() - 1)]).into_owned()
    };
    let run = uccl_tcpx_run_t { mr: 1, remote: FifoItem::default(), num_pieces: 1 };
    let piece = uccl_tcpx_piece_t { local_addr: 4096, remote_addr: 4096, len: 8 };
    let mut id = 0u64;
    let bad = UcclStatus::ErrInvalidParam as i32;
    assert_eq!(uccl_tcpx_write_pieces(null_mut(), &run, 1, &piece, 1, &mut id), bad, "{}", last());
    assert!(last().contains("connection handle is NULL"), "{}", last());
    assert_eq!(uccl_tcpx_write_pieces(null_mut(), &run, 1, &piece, 1, null_mut()), bad);
    assert!(last().contains("transfer_id"), "{}", last());
    assert_eq!(uccl_tcpx_read_pieces(null_mut(), std::ptr::null(), 1, &piece, 1, &mut id), bad);
    assert!(last().contains("runs"), "{}", last());
    assert_eq!(uccl_tcpx_read_pieces(null_mut(), &run, 1, std::ptr::null(), 1, &mut id), bad);
    assert!(last().contains("pieces"), "{}", last());
    assert_eq!(uccl_tcpx_write_pieces(null_mut(), &run, 0, &piece, 0, &mut id), bad);
    assert!(last().contains("zero"), "{}", last());
}
