//! Vector writes and reads end to end over loopback: items scattered on both ends travel as one
//! request per remote region and one flow, whose chunks span items. Every byte lands in its item,
//! nothing lands between items, and a vector with one item outside the advertised window fails
//! whole without touching the target.

use uccl_tcpx::{Config, OneSided, UcclStatus};

mod common;
use common::engine::Region;
use common::{Pair, Rng, pattern, wait};

/// Small chunks, so a vector's flow has many chunks and items cross chunk boundaries.
fn config() -> Config {
    Config { num_channels: Some(3), chunk_size: 64 << 10, ..common::loopback() }
}

fn pair() -> Pair {
    common::pair(config())
}

/// `(local offset, remote offset, len)` per item: lengths from `lens` (cycled) until `count`
/// items, each side's items in its own shuffled order of slots `slot` bytes apart, so neither side
/// has two items next to each other or in address order.
fn scatter(lens: &[usize], count: usize, slot: usize, stream: &str) -> Vec<(usize, usize, usize)> {
    let mut rng = Rng::new(stream);
    let mut shuffled = |n: usize| {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, rng.below(i + 1));
        }
        v
    };
    let (l, r) = (shuffled(count), shuffled(count));
    (0..count).map(|i| (l[i] * slot, r[i] * slot, lens[i % lens.len()])).collect()
}

fn items(local: &Region, remote: &Region, spans: &[(usize, usize, usize)]) -> Vec<OneSided> {
    spans
        .iter()
        .map(|&(lo, ro, len)| {
            let mut fifo = remote.fifo;
            fifo.addr += ro as u64;
            fifo.size = len as u32;
            OneSided { mr: local.mr, addr: local.addr() + lo, len, remote: fifo }
        })
        .collect()
}

/// `to` holds `from`'s item bytes at its item offsets and its own `fill` everywhere else.
fn landed(from: &[u8], to: &[u8], spans: &[(usize, usize, usize)], fill: u8, written_is_remote: bool) -> bool {
    let mut expected = vec![fill; to.len()];
    for &(lo, ro, len) in spans {
        let (src, dst) = if written_is_remote { (lo, ro) } else { (ro, lo) };
        expected[dst..dst + len].copy_from_slice(&from[src..src + len]);
    }
    expected == to
}

#[test]
fn scattered_vectors_of_many_sizes_write_and_read_every_item_and_nothing_else() {
    let p = pair();
    // Odd sizes: a byte, around a page, around a chunk (64 KiB here), several chunks.
    let lens = [1usize, 4095, 4096, 4097, 16 << 10, 65_535, 65_536, 65_537, 100_003, 777];
    let slot = 200 << 10;
    let count = 40;
    let spans = scatter(&lens, count, slot, "vectors-sizes");
    let total: u64 = spans.iter().map(|s| s.2 as u64).sum();
    let src = Region::new(&p.a, pattern(count * slot, 1));
    let mut dst = Region::new(&p.b, vec![0xEE; count * slot]);
    let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total);
    assert!(landed(&src.bytes, &dst.bytes, &spans, 0xEE, true), "written items and untouched gaps");

    dst.bytes.copy_from_slice(&pattern(count * slot, 2));
    let mut back = Region::new(&p.a, vec![0xAA; count * slot]);
    let r = p.ab.read(&items(&back, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total);
    assert!(landed(&dst.bytes, &back.bytes, &spans, 0xAA, false), "read items and untouched gaps");
    back.bytes.fill(0);
}

/// Vectors below a full chunk per channel are spread over every channel in smaller chunks that
/// still span items: 4 channels x 2 MiB, a plugin engine's layout from 16 cores.
#[test]
fn mid_size_vectors_spread_over_the_channels_write_and_read_every_item() {
    let p = common::pair(Config { num_channels: Some(4), chunk_size: 2 << 20, ..common::loopback() });
    for (count, lens) in [(64usize, &[16usize << 10][..]), (12, &[100_003, 1, 300_001, 4096][..]), (3, &[2 << 20][..])]
    {
        let slot = lens.iter().max().unwrap().next_multiple_of(4096) + 4096;
        let spans = scatter(lens, count, slot, &format!("spread {count}"));
        let total: u64 = spans.iter().map(|s| s.2 as u64).sum();
        assert!(total < 8 << 20, "below a full chunk per channel");
        let src = Region::new(&p.a, pattern(count * slot, 3));
        let mut dst = Region::new(&p.b, vec![0xEE; count * slot]);
        let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), total);
        assert!(landed(&src.bytes, &dst.bytes, &spans, 0xEE, true), "{count} items: written items and gaps");
        dst.bytes.copy_from_slice(&pattern(count * slot, 4));
        let back = Region::new(&p.a, vec![0xAA; count * slot]);
        let r = p.ab.read(&items(&back, &dst, &spans)).unwrap();
        assert_eq!(wait(&p.ab, r).unwrap(), total);
        assert!(landed(&dst.bytes, &back.bytes, &spans, 0xAA, false), "{count} items: read items and gaps");
    }
}

/// Items side by side in memory are joined into one range per chunk before the transport sees
/// them: on one end every item follows the one before it (each chunk one contiguous request), on the
/// other runs of three do, in shuffled order (so chunks of four items hold a joined run and a piece of
/// another: a vectored request of joined ranges); every byte still lands where its item says, and
/// nothing else is touched.
#[test]
fn items_side_by_side_move_joined_and_every_byte_lands_in_place() {
    let p = pair();
    let (count, len, run) = (96usize, 16usize << 10, 3usize);
    let mut rng = Rng::new("side by side");
    let mut runs: Vec<usize> = (0..count / run).collect();
    for i in (1..runs.len()).rev() {
        runs.swap(i, rng.below(i + 1));
    }
    // Remote: runs of three items side by side, the runs in shuffled slots with a page between them.
    let slot = run * len + 4096;
    let spans: Vec<(usize, usize, usize)> =
        (0..count).map(|i| (i * len, runs[i / run] * slot + (i % run) * len, len)).collect();
    let total = (count * len) as u64;
    let remote_size = runs.len() * slot;

    let src = Region::new(&p.a, pattern(count * len, 5));
    let mut dst = Region::new(&p.b, vec![0xEE; remote_size]);
    let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total);
    assert!(landed(&src.bytes, &dst.bytes, &spans, 0xEE, true), "written: runs in place, gaps untouched");

    dst.bytes.copy_from_slice(&pattern(remote_size, 6));
    let back = Region::new(&p.a, vec![0xAA; count * len]);
    let r = p.ab.read(&items(&back, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total);
    assert!(landed(&dst.bytes, &back.bytes, &spans, 0xAA, false), "read back in item order");

    // The same local bytes listed again and again (repeats, not neighbours) are not joined: each
    // item sends the first 16 KiB once more, to remote items side by side.
    let repeats: Vec<(usize, usize, usize)> = (0..32).map(|i| (0, i * len, len)).collect();
    let w = p.ab.write(&items(&src, &dst, &repeats)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), 32 * len as u64);
    for i in 0..32 {
        assert_eq!(dst.bytes[i * len..(i + 1) * len], src.bytes[..len], "item {i}");
    }
}

#[test]
fn a_vector_with_one_item_outside_the_window_fails_whole_and_leaves_the_target_untouched() {
    let p = pair();
    let src = Region::new(&p.a, pattern(1 << 20, 3));
    let mut target = vec![0u8; 1 << 20];
    let tmr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    // Only the first half is advertised.
    let half = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, 512 << 10).unwrap();
    let dst = Region { bytes: Vec::new(), mr: tmr, fifo: half };
    let mut spans = scatter(&[10_000], 40, 12 << 10, "vectors-refusal");
    // The last item starts inside the window and runs past it.
    spans.push((900 << 10, (512 << 10) - 100, 4096));
    let mut local = Region::new(&p.a, vec![0x55; 1 << 20]);
    for write in [true, false] {
        let from = if write { &src } else { &local };
        let id = if write { p.ab.write(&items(from, &dst, &spans)) } else { p.ab.read(&items(from, &dst, &spans)) };
        let err = wait(&p.ab, id.unwrap()).unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrNotAllowed, "write {write}: {err}");
        assert_eq!(err.status() as i32, -6);
    }
    assert!(target.iter().all(|&x| x == 0), "the target is untouched");
    assert!(local.bytes.iter().all(|&x| x == 0x55), "nothing was read either");
    // The connection still works: the same vector without the bad item.
    spans.pop();
    let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), 400_000);
    let r = p.ab.read(&items(&local, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), 400_000);
    for &(lo, ro, len) in &spans {
        assert!(target[ro..ro + len] == src.bytes[lo..lo + len], "written item at {ro}");
        assert!(local.bytes[lo..lo + len] == src.bytes[lo..lo + len], "read item at {lo}");
    }
    local.bytes.fill(0);
}

#[test]
fn a_hundred_thousand_items_move_as_a_few_requests() {
    let p = pair();
    let (count, len, slot) = (100_000usize, 64usize, 96usize);
    let spans = scatter(&[len], count, slot, "vectors-many");
    let src = Region::new(&p.a, pattern(count * slot, 6));
    let dst = Region::new(&p.b, vec![0; count * slot]);
    let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), (count * len) as u64);
    assert!(landed(&src.bytes, &dst.bytes, &spans, 0, true));
    let mut back = Region::new(&p.a, vec![0; count * slot]);
    let r = p.ab.read(&items(&back, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), (count * len) as u64);
    assert!(landed(&dst.bytes, &back.bytes, &spans, 0, false));
    back.bytes.fill(0);
}

/// A call of several vector requests posts them one by one, but only once every item was checked:
/// a bad item at the very end fails the call at once, with no request of it sent (the same call
/// without it, to another target, then completes, and the first target and the read buffer were
/// never touched).
#[test]
fn a_call_of_several_requests_with_a_bad_last_item_fails_whole_and_sends_nothing() {
    let p = pair();
    let (count, len, slot) = (20_000usize, 64usize, 96usize);
    assert!(count > 2 * 8192, "several requests of at most 8192 segments");
    let spans = scatter(&[len], count, slot, "vectors-checked-first");
    let src = Region::new(&p.a, pattern(count * slot, 11));
    let mut dst = Region::new(&p.b, vec![0; count * slot]);
    let mut back = Region::new(&p.a, vec![0x33; count * slot]);
    let other = Region::new(&p.b, vec![0; count * slot]);
    let last = count - 1;
    // The last item asks for more than its FifoItem grants, or reaches past its local region.
    for (what, write) in [("too long", true), ("outside", true), ("too long", false)] {
        let mut call = items(if write { &src } else { &back }, &dst, &spans);
        if what == "too long" {
            call[last].remote.size -= 1;
        } else {
            call[last].addr = src.addr() + src.bytes.len() - len + 1;
        }
        let err = if write { p.ab.write(&call) } else { p.ab.read(&call) }.unwrap_err();
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{what}, write {write}: {err}");
        assert!(err.message().contains(&format!("item {last}")), "{what}: {err}");
    }
    let w = p.ab.write(&items(&src, &other, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), (count * len) as u64);
    assert!(landed(&src.bytes, &other.bytes, &spans, 0, true));
    assert!(dst.bytes.iter().all(|&x| x == 0), "no request of a refused call reached the target");
    assert!(back.bytes.iter().all(|&x| x == 0x33), "nor read into the local buffer");
    // The connection is fine: the calls without the bad item move.
    let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), (count * len) as u64);
    assert!(landed(&src.bytes, &dst.bytes, &spans, 0, true));
    let r = p.ab.read(&items(&back, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), (count * len) as u64);
    assert!(landed(&dst.bytes, &back.bytes, &spans, 0x33, false));
    dst.bytes.fill(0);
    back.bytes.fill(0);
}

#[test]
fn items_over_several_local_and_remote_regions_in_one_call() {
    let p = pair();
    let srcs = [Region::new(&p.a, pattern(2 << 20, 8)), Region::new(&p.a, pattern(2 << 20, 9))];
    let dsts = [Region::new(&p.b, vec![0; 2 << 20]), Region::new(&p.b, vec![0; 2 << 20])];
    // Runs of items alternate between regions on each side, so the call is several vectors.
    let spans = scatter(&[30_000, 5_000, 70_001], 24, 80 << 10, "vectors-regions");
    let mut calls = Vec::new();
    for (i, chunk) in spans.chunks(6).enumerate() {
        calls.extend(items(&srcs[i % 2], &dsts[(i / 2) % 2], chunk));
    }
    let w = p.ab.write(&calls).unwrap();
    let total: u64 = spans.iter().map(|s| s.2 as u64).sum();
    assert_eq!(wait(&p.ab, w).unwrap(), total);
    for (i, chunk) in spans.chunks(6).enumerate() {
        for &(lo, ro, len) in chunk {
            assert!(dsts[(i / 2) % 2].bytes[ro..ro + len] == srcs[i % 2].bytes[lo..lo + len], "item at {ro}");
        }
    }
}

/// Between engines of one process the same vectors are copied directly (`local_copy`), under the
/// same authorization: every segment lands, and one outside the window fails the whole request.
#[test]
fn scattered_vectors_between_engines_of_one_process_are_copied_directly() {
    let p = common::pair(Config { num_channels: Some(3), chunk_size: 64 << 10, ..common::same_host() });
    assert_eq!(p.ab.peer.locality, uccl_tcpx::Locality::SameProcess);
    let lens = [1usize, 4095, 4097, 65_537, 777];
    let (count, slot) = (30, 80 << 10);
    let spans = scatter(&lens, count, slot, "vectors-local");
    let total: u64 = spans.iter().map(|s| s.2 as u64).sum();
    let src = Region::new(&p.a, pattern(count * slot, 11));
    let mut dst = Region::new(&p.b, vec![0xEE; count * slot]);
    let w = p.ab.write(&items(&src, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total);
    assert!(landed(&src.bytes, &dst.bytes, &spans, 0xEE, true));
    dst.bytes.copy_from_slice(&pattern(count * slot, 12));
    let mut back = Region::new(&p.a, vec![0xAA; count * slot]);
    let r = p.ab.read(&items(&back, &dst, &spans)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total);
    assert!(landed(&dst.bytes, &back.bytes, &spans, 0xAA, false));
    // One segment past the advertised window: the whole vector is refused, nothing copied.
    let mut bad = items(&src, &dst, &spans);
    bad.last_mut().unwrap().remote.addr = (dst.addr() + dst.bytes.len() - 10) as u64;
    let before = dst.bytes.clone();
    let w = p.ab.write(&bad).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed);
    assert!(dst.bytes == before, "a refused vector copied nothing");
    back.bytes.fill(0);
}
