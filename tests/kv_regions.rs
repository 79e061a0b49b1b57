//! KV-cache requests at the region counts serving stacks register (one region per layer and K/V:
//! 64 for an 8B model, 160 for a 70B one): random block tables over 1, 16, 64 and 160 regions of
//! different sizes, registered in shuffled order and interleaved in the address space, READ and
//! WRITE, in both list forms (items, and the pieces the NIXL backend hands over), every byte
//! checked; on the socket transport, on the same-host path (engines of one process copy directly)
//! and on the plugin transport over the fake devmem NIC (host mode). Over the fake, the same
//! pieces over 160 regions make no more requests than in one region. A region deregistered
//! between two requests fails the next with a status, and nothing lands in it.

use uccl_tcpx::{Config, Engine, FifoItem, OneSided, Piece, PieceRun, UcclStatus};

mod common;
use common::plugin::fake_requests;
use common::{Pair, Rng, plugin, wait};

const BLOCK: usize = 16 << 10;

/// The fake counts requests for its whole process: the tests of this binary take turns, so no
/// other test's requests land in the count one test takes.
static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner())
}

/// One end's regions: carved out of one allocation in shuffled order with gaps, so regions lie
/// interleaved in the address space, each with its own number of blocks, registered in another
/// shuffled order.
struct Regions {
    _mem: Vec<u8>,
    base: Vec<usize>,
    blocks: Vec<usize>,
    mrs: Vec<u64>,
    fifos: Vec<FifoItem>,
}

impl Regions {
    fn new(engine: &Engine, rng: &mut Rng, blocks: &[usize], fill: u8) -> Regions {
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        rng.shuffle(&mut order);
        let gap = 4096 + 64;
        let total: usize = blocks.iter().map(|b| b * BLOCK + gap).sum();
        let mut mem: Vec<u8> = (0..total).map(|i| (i as u8).wrapping_mul(13).wrapping_add(fill)).collect();
        let mut base = vec![0; blocks.len()];
        let mut at = mem.as_mut_ptr() as usize;
        for &r in &order {
            base[r] = at;
            at += blocks[r] * BLOCK + gap;
        }
        rng.shuffle(&mut order);
        let (mut mrs, mut fifos) = (vec![0; blocks.len()], vec![None; blocks.len()]);
        for &r in &order {
            let len = blocks[r] * BLOCK;
            mrs[r] = engine.register(base[r], len).unwrap();
            fifos[r] = Some(engine.prepare_fifo(mrs[r], base[r], len).unwrap());
        }
        let fifos = fifos.into_iter().map(Option::unwrap).collect();
        Regions { _mem: mem, base, blocks: blocks.to_vec(), mrs, fifos }
    }

    fn block(&self, r: usize, b: usize) -> &[u8] {
        // SAFETY: the block lies in `_mem`, which this struct keeps alive.
        unsafe { std::slice::from_raw_parts((self.base[r] + b * BLOCK) as *const u8, BLOCK) }
    }
}

/// A request's block table: per region, `per` distinct random blocks here and there, region-major.
fn table(rng: &mut Rng, here: &Regions, there: &Regions, per: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for r in 0..here.blocks.len() {
        let mut mine: Vec<usize> = (0..here.blocks[r]).collect();
        let mut theirs: Vec<usize> = (0..there.blocks[r]).collect();
        rng.shuffle(&mut mine);
        rng.shuffle(&mut theirs);
        out.extend((0..per.min(here.blocks[r]).min(there.blocks[r])).map(|i| (r, mine[i], theirs[i])));
    }
    out
}

/// Moves `table` between `a`'s regions and `b`'s (write: a to b) and checks every block.
fn request(p: &Pair, a: &Regions, b: &Regions, table: &[(usize, usize, usize)], write: bool, pieces: bool) {
    let id = if pieces {
        let mut runs: Vec<PieceRun> = Vec::new();
        let mut list = Vec::with_capacity(table.len());
        for &(r, mine, theirs) in table {
            if runs.last().is_none_or(|run| run.mr != a.mrs[r]) {
                runs.push(PieceRun { mr: a.mrs[r], remote: b.fifos[r], pieces: 0 });
            }
            runs.last_mut().unwrap().pieces += 1;
            let (local, remote) = (a.base[r] + mine * BLOCK, b.fifos[r].addr as usize + theirs * BLOCK);
            list.push(Piece { local: local as u64, remote: remote as u64, len: BLOCK as u64 });
        }
        if write { p.ab.write_pieces(&runs, &list) } else { p.ab.read_pieces(&runs, &list) }
    } else {
        let items: Vec<OneSided> = table
            .iter()
            .map(|&(r, mine, theirs)| {
                let mut remote = b.fifos[r];
                remote.addr += (theirs * BLOCK) as u64;
                OneSided { mr: a.mrs[r], addr: a.base[r] + mine * BLOCK, len: BLOCK, remote }
            })
            .collect();
        if write { p.ab.write(&items) } else { p.ab.read(&items) }
    };
    assert_eq!(wait(&p.ab, id.unwrap()).unwrap(), (table.len() * BLOCK) as u64);
    for (i, &(r, mine, theirs)) in table.iter().enumerate() {
        assert!(a.block(r, mine) == b.block(r, theirs), "piece {i}: region {r}, block {mine} <-> {theirs}");
    }
}

/// Every region count, both ways, both list forms, blocks in region order and in any order.
fn every_shape(config: Config, stream: &str) {
    let _turn = one_at_a_time();
    let p = common::pair(config);
    let mut rng = Rng::new(stream);
    for regions in [1, 16, 64, 160] {
        let per = (256 / regions).max(2);
        let blocks: Vec<usize> = (0..regions).map(|r| per + 1 + r % 3).collect();
        let a = Regions::new(&p.a, &mut rng, &blocks, 1);
        let b = Regions::new(&p.b, &mut rng, &blocks, 101);
        // Region-major as serving stacks list them, and in any order (items hopping between
        // regions at each block: a run, a request on the same-host path, per item).
        let shapes = [(true, false, false), (false, false, false), (true, true, false), (false, true, false)];
        for (write, pieces, hop) in shapes.into_iter().chain([(true, false, true), (false, false, true)]) {
            let mut t = table(&mut rng, &a, &b, per);
            if hop {
                rng.shuffle(&mut t);
            }
            request(&p, &a, &b, &t, write, pieces);
        }
    }
}

#[test]
fn block_tables_over_many_regions_land_every_byte_on_the_socket_transport() {
    every_shape(Config { num_channels: Some(3), chunk_size: 256 << 10, ..common::loopback() }, "kv_regions_socket");
}

#[test]
fn block_tables_over_many_regions_land_every_byte_on_the_same_host_path() {
    let p = common::pair(common::same_host());
    assert_eq!(p.ab.peer.locality, uccl_tcpx::Locality::SameProcess);
    drop(p);
    every_shape(common::same_host(), "kv_regions_same_host");
}

#[test]
fn block_tables_over_many_regions_land_every_byte_over_the_fake_nic() {
    every_shape(plugin::config(2, 1 << 20), "kv_regions_fake");
}

#[test]
fn the_same_pieces_over_160_regions_make_no_more_requests_than_one_region() {
    let _turn = one_at_a_time();
    let path = plugin::fake_plugin();
    let p = common::pair(plugin::config(2, 1 << 20));
    let mut rng = Rng::new("kv_regions_requests");
    // 8,000 blocks of 16 KiB a request: 160 regions of 50, and one region of 8,000.
    let count = |a: &Regions, b: &Regions, t: &[(usize, usize, usize)], write: bool| {
        let before = fake_requests(&path);
        request(&p, a, b, t, write, true);
        let after = fake_requests(&path);
        (after.0 - before.0, after.1 - before.1)
    };
    let (many_a, many_b) = (Regions::new(&p.a, &mut rng, &[60; 160], 3), Regions::new(&p.b, &mut rng, &[60; 160], 4));
    let (one_a, one_b) = (Regions::new(&p.a, &mut rng, &[9600], 5), Regions::new(&p.b, &mut rng, &[9600], 6));
    for write in [true, false] {
        let many = count(&many_a, &many_b, &table(&mut rng, &many_a, &many_b, 50), write);
        let one = count(&one_a, &one_b, &table(&mut rng, &one_a, &one_b, 8000), write);
        println!("write {write}: 160 regions {many:?} requests (sends, receives), one region {one:?}");
        // 125 MiB take 125 chunks of 1 MiB in one region or 160: chunks cross from one region's
        // 800 KiB into the next (cut per region, they took a request per region, 160; a flow per
        // region spread over both channels took two to four each).
        assert!(many.0 <= one.0 && many.1 <= one.1, "write {write}: {many:?} against {one:?}");
        assert!(many.0 >= 125 && many.1 >= 125, "write {write}: {many:?}");
    }
}

#[test]
fn a_region_deregistered_between_two_requests_fails_the_next_and_nothing_lands_in_it() {
    let _turn = one_at_a_time();
    for config in [common::loopback(), common::same_host(), plugin::config(2, 1 << 20)] {
        let p = common::pair(config);
        let mut rng = Rng::new("kv_regions_deregistered");
        let blocks = [6; 64];
        let a = Regions::new(&p.a, &mut rng, &blocks, 7);
        let b = Regions::new(&p.b, &mut rng, &blocks, 8);
        let t = table(&mut rng, &a, &b, 4);
        request(&p, &a, &b, &t, true, true);
        // The target's region 30 goes: the next write names it and fails whole; region 30's bytes
        // stay as the first write left them.
        let kept: Vec<u8> = (0..6).flat_map(|blk| b.block(30, blk).to_vec()).collect();
        p.b.deregister(b.mrs[30]).unwrap();
        let t = table(&mut rng, &a, &b, 4);
        for write in [true, false] {
            let err = {
                let mut runs: Vec<PieceRun> = Vec::new();
                let mut list = Vec::new();
                for &(r, mine, theirs) in &t {
                    if runs.last().is_none_or(|run| run.mr != a.mrs[r]) {
                        runs.push(PieceRun { mr: a.mrs[r], remote: b.fifos[r], pieces: 0 });
                    }
                    runs.last_mut().unwrap().pieces += 1;
                    let remote = b.fifos[r].addr as usize + theirs * BLOCK;
                    list.push(Piece {
                        local: (a.base[r] + mine * BLOCK) as u64,
                        remote: remote as u64,
                        len: BLOCK as u64,
                    });
                }
                let id = if write { p.ab.write_pieces(&runs, &list) } else { p.ab.read_pieces(&runs, &list) };
                wait(&p.ab, id.unwrap()).expect_err("a request naming a deregistered region fails")
            };
            assert!(matches!(err.status(), UcclStatus::ErrNotAllowed | UcclStatus::ErrNotFound), "{err:?}");
        }
        let now: Vec<u8> = (0..6).flat_map(|blk| b.block(30, blk).to_vec()).collect();
        assert!(now == kept, "nothing landed in the deregistered region");
        // The connection still serves requests that name live regions only.
        let live: Vec<_> = table(&mut rng, &a, &b, 2).into_iter().filter(|&(r, _, _)| r != 30).collect();
        request(&p, &a, &b, &live, true, false);
    }
}
