//! GPU memory through the public Engine API: every transfer kind (send/recv, write, read, vectors)
//! GPU->GPU, GPU->host and host->GPU over loopback, sizes from 1 byte to 256 MiB at unaligned
//! offsets, byte for byte; two processes sharing one GPU; the GPU identity in metadata and
//! handshake, and how an engine learns its GPU (UCCL_TCPX_GPU, the GPU current at creation, its
//! first registration) in NIXL's order of calls, one engine per GPU. On machines without a CUDA
//! driver the GPU tests print "SKIPPED: no CUDA driver", and those needing two GPUs say so on
//! hosts with one;
//! `host_memory_without_a_driver` runs everywhere.
//!
//! These drive device memory through the engine's chunk posts. The staging decorator also stages
//! posts made without a registration handle (it asks CUDA what the pointer is), so they pass with
//! or without the engine registering regions per comm.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::internal::cuda;
use uccl_tcpx::{Config, Engine, FifoItem, OneSided, UcclStatus};

mod common;
use common::gpu::{
    Kind, Mem, Side, blocks, connect_by_metadata, every_kind_every_direction, fewer_gpus_than, landed, make_current,
    move_bytes, no_gpu, odd_pieces, span, three_items_every_vector_way,
};
use common::{ChildTest, PATIENCE, assert_same, loopback as config, pair, pattern, wait};

#[test]
fn every_kind_every_direction_every_size() {
    if no_gpu() {
        return;
    }
    let p = pair(config());
    let sizes = [1usize, 7, 4097, 65_536, 65_537, (1 << 20) - 3, (4 << 20) + 17, (64 << 20) + 5, 256 << 20];
    every_kind_every_direction(&p, &sizes);
    let gpu = p.a.gpu().expect("device registrations chose a GPU");
    assert_eq!(gpu.ordinal(), 0);
}

/// The first registration of GPU memory builds that GPU's unpack kernel on the registering thread,
/// outside every lock, and leaves the thread's current context as it was; a host registration does
/// not build it. The paths under a connection's lock only take a kernel already built. In a
/// process of its own, in which no other test built the kernel.
#[test]
fn registering_gpu_memory_builds_the_kernel() {
    if no_gpu() || common::gpu::no_nvrtc() {
        return;
    }
    ChildTest::new("registering_gpu_memory_builds_the_kernel_process").ignored().run();
}

#[test]
#[ignore = "runs as the child process of registering_gpu_memory_builds_the_kernel"]
fn registering_gpu_memory_builds_the_kernel_process() {
    use uccl_tcpx::internal::cuda::unpack::UnpackKernels;
    assert!(common::is_child("registering_gpu_memory_builds_the_kernel_process"));
    let engine = Engine::new(Config { gpu: Some(0), ..config() }).unwrap();
    let host = Mem::new(Side::Host, 1 << 20);
    let _host_mr = engine.register(host.addr(), host.len()).unwrap();
    assert!(UnpackKernels::if_built(0).is_none(), "neither the engine nor host memory builds it");
    let gpu = Mem::new(Side::Gpu, 1 << 20);
    make_current(None);
    let _gpu_mr = engine.register(gpu.addr(), gpu.len()).unwrap();
    assert!(matches!(UnpackKernels::if_built(0), Some(Ok(_))), "the registration built it");
    assert_eq!(cuda::gpu::current_ordinal(), None, "the build left a context current");
}

/// A write's first chunks are posted by the caller's own thread, and a staged device chunk's copy
/// binds the engine's GPU there: the caller's current context (none here, as on a thread that never
/// touched CUDA) is what it was once the write returns, and again after its wait.
#[test]
fn posting_a_device_write_leaves_the_callers_context_alone() {
    if no_gpu() {
        return;
    }
    let p = pair(config());
    let len = (4 << 20) + 17;
    let mut src = Mem::new(Side::Gpu, len);
    src.write(0, &pattern(len, 41));
    let dst = Mem::new(Side::Host, len);
    let smr = p.a.register(src.addr(), len).unwrap();
    let dmr = p.b.register(dst.addr(), len).unwrap();
    let remote = p.b.prepare_fifo(dmr, dst.addr(), len).unwrap();
    for round in 0..3 {
        make_current(None);
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len, remote }]).unwrap();
        assert_eq!(cuda::gpu::current_ordinal(), None, "round {round}: the write left a context current");
        assert_eq!(wait(&p.ab, w).unwrap(), len as u64);
        assert_eq!(cuda::gpu::current_ordinal(), None, "round {round}: the wait left a context current");
    }
    assert_same(&dst.read(0, len), &pattern(len, 41), "the write's bytes");
}

#[test]
fn vectors_mix_gpu_and_host_items() {
    if no_gpu() {
        return;
    }
    let p = pair(Config { num_channels: Some(3), chunk_size: 256 << 10, ..config() });
    three_items_every_vector_way(&p, [Side::Gpu, Side::Host, Side::Gpu], [Side::Host, Side::Gpu, Side::Gpu]);
}

/// Many scattered items between one region on each side, as KV-cache blocks move: one vector
/// request and one flow whose chunks span items, gathered into and scattered out of the staging
/// slots; every direction, every byte, nothing between the items.
#[test]
fn scattered_vectors_of_device_memory() {
    if no_gpu() {
        return;
    }
    let p = pair(Config { num_channels: Some(2), chunk_size: 256 << 10, ..config() });
    let (count, slot) = (300usize, 24usize << 10);
    let lens = [16usize << 10, 4097, 1, 20_000];
    let spans: Vec<(usize, usize, usize)> =
        (0..count).map(|i| (((i * 7) % count) * slot, ((i * 13) % count) * slot + 5, lens[i % lens.len()])).collect();
    let total: usize = spans.iter().map(|s| s.2).sum();
    let size = count * slot + 64;
    for (from, to) in [(Side::Gpu, Side::Gpu), (Side::Gpu, Side::Host), (Side::Host, Side::Gpu)] {
        let data = pattern(size, 77);
        let mut src = Mem::new(from, size);
        src.write(0, &data);
        let mut dst = Mem::new(to, size);
        dst.clear();
        let smr = p.a.register(src.addr(), size).unwrap();
        let dmr = p.b.register(dst.addr(), size).unwrap();
        let fifo = p.b.prepare_fifo(dmr, dst.addr(), size).unwrap();
        let items: Vec<OneSided> = spans
            .iter()
            .map(|&(lo, ro, len)| {
                let mut remote = fifo;
                remote.addr += ro as u64;
                OneSided { mr: smr, addr: src.addr() + lo, len, remote }
            })
            .collect();
        let w = p.ab.write(&items).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), total as u64, "{from:?}->{to:?}");
        let landed = dst.read(0, size);
        let mut want = vec![0u8; size];
        for &(lo, ro, len) in &spans {
            want[ro..ro + len].copy_from_slice(&data[lo..lo + len]);
        }
        assert_same(&landed, &want, &format!("vector write {from:?}->{to:?}"));
        // Read them back into a cleared source.
        src.clear();
        let r = p.ab.read(&items).unwrap();
        assert_eq!(wait(&p.ab, r).unwrap(), total as u64, "{from:?}<-{to:?}");
        let back = src.read(0, size);
        let mut want = vec![0u8; size];
        for &(lo, _, len) in &spans {
            want[lo..lo + len].copy_from_slice(&data[lo..lo + len]);
        }
        assert_same(&back, &want, &format!("vector read {from:?}<-{to:?}"));
        p.a.deregister(smr).unwrap();
        p.b.deregister(dmr).unwrap();
    }
}

/// Device items side by side travel as one range per chunk where their region lies in one
/// allocation, and one by one where it spans two allocations that touch: the driver refuses one
/// copy that runs from one allocation into the next. Both write and read back every byte.
#[test]
fn device_items_side_by_side_within_one_allocation_and_across_two() {
    if no_gpu() {
        return;
    }
    const LEN: usize = 1 << 20;
    const ITEM: usize = 16 << 10;
    let p = pair(Config { num_channels: Some(2), chunk_size: 256 << 10, ..config() });
    // Allocations until two touch (drivers carve equal small allocations out of one block), all
    // kept until the end so that none is handed out again meanwhile.
    let mut held: Vec<cuda::DeviceBuffer> = Vec::new();
    let mut touching = None;
    for _ in 0..64 {
        let buf = cuda::DeviceBuffer::new(0, LEN).expect("allocate device memory");
        let found = held.iter().position(|b| b.addr() + LEN == buf.addr() || buf.addr() + LEN == b.addr());
        held.push(buf);
        if let Some(i) = found {
            touching = Some((i, held.len() - 1));
            break;
        }
    }
    // One allocation (the first held), and the two that touch as one region: each a list of held
    // allocations in address order.
    let mut regions = vec![(vec![0], "one allocation")];
    match touching {
        Some((i, j)) if held[i].addr() < held[j].addr() => regions.push((vec![i, j], "two allocations")),
        Some((i, j)) => regions.push((vec![j, i], "two allocations")),
        None => println!("no two of 64 device allocations touch on this driver: only the single allocation is tried"),
    }
    for (parts, what) in regions {
        let (base, size) = (held[parts[0]].addr(), parts.len() * LEN);
        let data = pattern(size, 31);
        for (k, &i) in parts.iter().enumerate() {
            held[i].copy_from_host(0, &data[k * LEN..(k + 1) * LEN]).expect("fill the source");
        }
        let mut dst = Mem::new(Side::Gpu, size);
        dst.clear();
        let smr = p.a.register(base, size).unwrap();
        let dmr = p.b.register(dst.addr(), size).unwrap();
        let fifo = p.b.prepare_fifo(dmr, dst.addr(), size).unwrap();
        // Items side by side on both ends, over the middle of the range (where two allocations meet).
        let first = size / 2 - 8 * ITEM;
        let items: Vec<OneSided> = (0..16)
            .map(|k| {
                let mut remote = fifo;
                remote.addr += (first + k * ITEM) as u64;
                OneSided { mr: smr, addr: base + first + k * ITEM, len: ITEM, remote }
            })
            .collect();
        let w = p.ab.write(&items).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), (16 * ITEM) as u64, "{what}: write");
        let mut want = vec![0u8; size];
        want[first..first + 16 * ITEM].copy_from_slice(&data[first..first + 16 * ITEM]);
        assert_same(&dst.read(0, size), &want, &format!("{what}: written items"));
        for &i in &parts {
            held[i].fill(0).expect("clear the source");
        }
        let r = p.ab.read(&items).unwrap();
        assert_eq!(wait(&p.ab, r).unwrap(), (16 * ITEM) as u64, "{what}: read");
        let mut back = vec![0u8; size];
        for (k, &i) in parts.iter().enumerate() {
            held[i].copy_to_host(0, &mut back[k * LEN..(k + 1) * LEN]).expect("read the source back");
        }
        assert_same(&back, &want, &format!("{what}: read back"));
        p.a.deregister(smr).unwrap();
        p.b.deregister(dmr).unwrap();
    }
}

/// `write_vector` / `read_vector` of device pieces many and small (1024 KV-cache blocks of 16 KiB,
/// 1000 pieces of 1-5000 bytes at odd offsets) in both gather modes: `auto`, where the segment
/// kernel gathers each chunk into its staging slot and scatters it out, and `copies`, one copy per
/// piece as where the kernel cannot be built. GPU->GPU, GPU->host and host->GPU, every byte of both
/// buffers (nothing between the pieces written), and the staged chunks counted on the mode's path.
#[test]
fn device_vectors_of_many_small_pieces_in_both_gather_modes() {
    use uccl_tcpx::internal::cuda::ring::segment_copy_counts;
    use uccl_tcpx::{StagingConfig, StagingGather};
    if no_gpu() || common::gpu::no_nvrtc() {
        return;
    }
    let mut rng = common::Rng::new("device_vectors_of_many_small_pieces_in_both_gather_modes");
    let odd = odd_pieces(&mut rng, 1000, 5000);
    // The same lengths at other odd offsets on the remote side.
    let mut at = 3;
    let odd_remote: Vec<(usize, usize)> = odd
        .iter()
        .map(|&(_, len)| {
            let piece = (at, len);
            at += len + 1 + 2 * rng.below(40);
            piece
        })
        .collect();
    let shapes = [
        ("1024 x 16 KiB", blocks(1024, 16 << 10, 20 << 10, 0), blocks(1024, 16 << 10, 24 << 10, 4096)),
        ("1000 odd pieces", odd, odd_remote),
    ];
    for mode in [StagingGather::Auto, StagingGather::Copies] {
        let config = Config { staging: StagingConfig { gather: mode, ..StagingConfig::default() }, ..config() };
        let chunk = config.chunk_size as usize;
        let p = pair(config);
        for (name, local, remote) in &shapes {
            let total: usize = local.iter().map(|l| l.1).sum();
            let (local_len, remote_len) = (span(local) + 8, span(remote) + 8);
            for (from, to) in [(Side::Gpu, Side::Gpu), (Side::Gpu, Side::Host), (Side::Host, Side::Gpu)] {
                let what = format!("{mode:?}, {name}, {from:?}->{to:?}");
                let data = pattern(local_len, 91);
                let mut src = Mem::new(from, local_len);
                src.write(0, &data);
                let mut dst = Mem::new(to, remote_len);
                let smr = p.a.register(src.addr(), local_len).unwrap();
                let dmr = p.b.register(dst.addr(), remote_len).unwrap();
                let fifo = p.b.prepare_fifo(dmr, dst.addr(), remote_len).unwrap();
                let items: Vec<OneSided> = local
                    .iter()
                    .zip(remote)
                    .map(|(&(lo, len), &(ro, _))| {
                        let mut item = fifo;
                        item.addr += ro as u64;
                        OneSided { mr: smr, addr: src.addr() + lo, len, remote: item }
                    })
                    .collect();
                // Every full chunk holds several pieces; each is gathered where its source is a GPU
                // and scattered where its destination is.
                let staged = (total / chunk) as u64 * (u64::from(from == Side::Gpu) + u64::from(to == Side::Gpu));
                let moved = |before: uccl_tcpx::internal::cuda::ring::SegmentCopyCounts| {
                    let after = segment_copy_counts();
                    match mode {
                        StagingGather::Copies => after.by_copies - before.by_copies,
                        _ => after.by_kernel - before.by_kernel,
                    }
                };

                let before = segment_copy_counts();
                let w = p.ab.write(&items).unwrap();
                assert_eq!(wait(&p.ab, w).unwrap(), total as u64, "{what}");
                let expect = landed(&data, local, remote, remote_len);
                assert_same(&dst.read(0, remote_len), &expect, &format!("write_vector {what}"));
                let n = moved(before);
                assert!(n >= staged, "write_vector {what}: {n} of {staged} staged chunks on the mode's path");

                // Read them back into a cleared source.
                src.clear();
                let before = segment_copy_counts();
                let r = p.ab.read(&items).unwrap();
                assert_eq!(wait(&p.ab, r).unwrap(), total as u64, "{what}");
                let expect = landed(&expect, remote, local, local_len);
                assert_same(&src.read(0, local_len), &expect, &format!("read_vector {what}"));
                let n = moved(before);
                assert!(n >= staged, "read_vector {what}: {n} of {staged} staged chunks on the mode's path");
                p.a.deregister(smr).unwrap();
                p.b.deregister(dmr).unwrap();
                dst.clear();
            }
        }
    }
}

#[test]
fn many_transfers_in_flight_at_once() {
    if no_gpu() {
        return;
    }
    let p = pair(Config { num_channels: Some(4), chunk_size: 512 << 10, window: 16, ..config() });
    let count = 12;
    let lens: Vec<usize> = (0..count).map(|i| (i * 777_777) % (6 << 20) + 1 + i).collect();
    let mut srcs: Vec<Mem> =
        (0..count).map(|i| Mem::new(if i % 3 == 2 { Side::Host } else { Side::Gpu }, lens[i] + 8)).collect();
    let dsts: Vec<Mem> =
        (0..count).map(|i| Mem::new(if i % 4 == 1 { Side::Host } else { Side::Gpu }, lens[i] + 8)).collect();
    let data: Vec<Vec<u8>> = (0..count).map(|i| pattern(lens[i], 500 + i as u64)).collect();
    for (m, d) in srcs.iter_mut().zip(&data) {
        m.write(2, d);
    }
    let smrs: Vec<u64> = srcs.iter().map(|m| p.a.register(m.addr(), m.len()).unwrap()).collect();
    let dmrs: Vec<u64> = dsts.iter().map(|m| p.b.register(m.addr(), m.len()).unwrap()).collect();
    // Even items are one-sided writes, odd ones send/recv; all posted before any is waited for.
    let mut pending = Vec::new();
    for i in 0..count {
        if i % 2 == 0 {
            let mut remote = p.b.prepare_fifo(dmrs[i], dsts[i].addr(), dsts[i].len()).unwrap();
            remote.addr += 4;
            let op = OneSided { mr: smrs[i], addr: srcs[i].addr() + 2, len: lens[i], remote };
            pending.push((None, p.ab.write(&[op]).unwrap()));
        } else {
            let r = p.ba.recv(dmrs[i], dsts[i].addr() + 4, lens[i]).unwrap();
            pending.push((Some(r), p.ab.send(&[(smrs[i], srcs[i].addr() + 2, lens[i])]).unwrap()));
        }
    }
    for (i, (recv, id)) in pending.into_iter().enumerate() {
        assert_eq!(wait(&p.ab, id).unwrap(), lens[i] as u64);
        if let Some(r) = recv {
            assert_eq!(wait(&p.ba, r).unwrap(), lens[i] as u64);
        }
    }
    for i in 0..count {
        let what = format!("item {i} ({:?}->{:?}, {} bytes)", srcs[i].side(), dsts[i].side(), lens[i]);
        assert_same(&dsts[i].read(4, lens[i]), &data[i], &what);
    }
}

/// Inline transfers of device memory many at a time: 64 KiB writes, reads and sends (the device
/// inline limit) all posted before any is waited for, so that a reader finds several payloads
/// queued and starts their copies while it reads on (answering each once its copy is done); then
/// one of each alone, which a reader going idle waits for. Byte for byte, and the GPU's copier
/// started copies for them.
#[test]
fn inline_device_transfers_in_flight_start_their_copies() {
    use uccl_tcpx::internal::cuda::small_copy::{MAX_SMALL_COPY, SmallCopier};
    if no_gpu() {
        return;
    }
    let copier = SmallCopier::for_gpu(&cuda::Gpu::open(0).unwrap()).unwrap();
    let p = pair(Config { gpu: Some(0), ..config() });
    let (count, len) = (24usize, MAX_SMALL_COPY);
    let (mut a_mem, mut b_mem) = (Mem::on_gpu(0, count * len), Mem::on_gpu(0, count * len));
    let (amr, bmr) =
        (p.a.register(a_mem.addr(), a_mem.len()).unwrap(), p.b.register(b_mem.addr(), b_mem.len()).unwrap());
    let b_span = (b_mem.addr(), b_mem.len());
    let started = copier.started();
    for round in [count, 1] {
        for kind in [Kind::Write, Kind::Read, Kind::SendRecv] {
            let data = pattern(round * len, round as u64 * 7 + kind as u64);
            let ((src, smr), (dst, dmr)) = match kind {
                Kind::Read => ((&mut b_mem, bmr), (&mut a_mem, amr)),
                _ => ((&mut a_mem, amr), (&mut b_mem, bmr)),
            };
            src.write(0, &data);
            dst.clear();
            let fifo = (!matches!(kind, Kind::SendRecv)).then(|| p.b.prepare_fifo(bmr, b_span.0, b_span.1).unwrap());
            let mut pending = Vec::new();
            for i in 0..round {
                let at = i * len;
                let id = match (kind, fifo) {
                    (Kind::SendRecv, _) => {
                        let r = p.ba.recv(dmr, dst.addr() + at, len).unwrap();
                        pending.push((&p.ba, r));
                        p.ab.send(&[(smr, src.addr() + at, len)]).unwrap()
                    }
                    (Kind::Write, Some(f)) => {
                        let remote = FifoItem { addr: f.addr + at as u64, ..f };
                        p.ab.write(&[OneSided { mr: smr, addr: src.addr() + at, len, remote }]).unwrap()
                    }
                    (_, Some(f)) => {
                        let remote = FifoItem { addr: f.addr + at as u64, ..f };
                        p.ab.read(&[OneSided { mr: dmr, addr: dst.addr() + at, len, remote }]).unwrap()
                    }
                    _ => unreachable!("one-sided kinds have a fifo item"),
                };
                pending.push((&p.ab, id));
            }
            for (conn, id) in pending {
                assert_eq!(wait(conn, id).unwrap(), len as u64, "{kind:?}, {round} at once");
            }
            assert_same(&dst.read(0, round * len), &data, &format!("{kind:?}, {round} at once"));
        }
    }
    // Each end's reader started the copies of the payloads it read (more than one write's worth
    // also had a slot free while earlier ones ran); a full set of slots falls back to waiting.
    assert!(copier.started() > started, "no copy was started: inline device copies all waited");
}

/// An engine inlining host memory up to 256 KiB (its bound below 8 CPUs) next to a peer's device
/// memory: host-memory writes and sends of up to the bound land in the peer's GPU memory from the
/// control stream (past the small copier's 64 KiB through plain synchronous copies), and reads
/// into host memory are served out of it; the data sockets carry none of them, and one byte more
/// takes the channels. Every kind and direction around the bound, byte for byte.
#[test]
fn host_transfers_inline_up_to_256k_next_to_device_memory() {
    if no_gpu() {
        return;
    }
    let bound = 256usize << 10;
    let p = pair(Config { inline_max: bound as u32, ..config() });
    every_kind_every_direction(&p, &[65_537, 200_003, bound, bound + 1]);
    let channel_bytes = |p: &common::Pair| -> u64 {
        let ends = [&p.ab, &p.ba];
        ends.iter().flat_map(|c| c.link_stats()).map(|l| l.out.bytes + l.inbound.bytes).sum()
    };
    for kind in [Kind::SendRecv, Kind::Write, Kind::Read] {
        // Host memory on engine a, device memory on b: a reads from b's GPU, writes and sends to it.
        let (host_side, gpu_side) = (Mem::new(Side::Host, bound + 8), Mem::new(Side::Gpu, bound + 8));
        let (hmr, gmr) = (
            p.a.register(host_side.addr(), host_side.len()).unwrap(),
            p.b.register(gpu_side.addr(), gpu_side.len()).unwrap(),
        );
        let (mut src, mut dst) = match kind {
            Kind::Read => ((gpu_side, gmr), (host_side, hmr)),
            _ => ((host_side, hmr), (gpu_side, gmr)),
        };
        for len in [bound, bound + 1] {
            let data = pattern(len, 77 + len as u64);
            src.0.write(1, &data);
            dst.0.clear();
            let before = channel_bytes(&p);
            move_bytes(&p, kind, (&src.0, src.1, 1), (&dst.0, dst.1, 2), len);
            let carried = channel_bytes(&p) - before;
            let what = format!("{kind:?} of {len} bytes, host memory on the initiator");
            assert_same(&dst.0.read(2, len), &data, &what);
            assert_eq!(carried == 0, len <= bound, "{what}: {carried} bytes on the data sockets");
        }
        p.a.deregister(hmr).unwrap();
        p.b.deregister(gmr).unwrap();
    }
}

/// Mid-size messages sent before their receives are posted wait in the receiver's landing memory
/// and are copied into device memory once the receives come, from GPU and host sources.
#[test]
fn mid_size_sends_ahead_of_their_device_receives() {
    if no_gpu() {
        return;
    }
    let p = pair(config());
    let lens = [65_537usize, (256 << 10) + 3, 1 << 20];
    let sides = [Side::Gpu, Side::Host, Side::Gpu];
    let data: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &n)| pattern(n, 900 + i as u64)).collect();
    let mut srcs: Vec<Mem> = lens.iter().zip(sides).map(|(&n, side)| Mem::new(side, n)).collect();
    for (m, d) in srcs.iter_mut().zip(&data) {
        m.write(0, d);
    }
    let dsts: Vec<Mem> = lens.iter().map(|&n| Mem::new(Side::Gpu, n + 8)).collect();
    let smrs: Vec<u64> = srcs.iter().map(|m| p.a.register(m.addr(), m.len()).unwrap()).collect();
    let dmrs: Vec<u64> = dsts.iter().map(|m| p.b.register(m.addr(), m.len()).unwrap()).collect();
    let sends: Vec<u64> = (0..lens.len()).map(|i| p.ab.send(&[(smrs[i], srcs[i].addr(), lens[i])]).unwrap()).collect();
    // Every message arrives before its receive (which then copies it out of landing memory).
    common::wait_until("the three messages land", PATIENCE, || p.ba.stats().landed == lens.len() as u64);
    let recvs: Vec<u64> = (0..lens.len()).map(|i| p.ba.recv(dmrs[i], dsts[i].addr() + 3, lens[i]).unwrap()).collect();
    for i in 0..lens.len() {
        assert_eq!(wait(&p.ab, sends[i]).unwrap(), lens[i] as u64);
        assert_eq!(wait(&p.ba, recvs[i]).unwrap(), lens[i] as u64);
        assert_same(&dsts[i].read(3, lens[i]), &data[i], &format!("message {i} ({} bytes)", lens[i]));
    }
    assert_eq!(p.ba.stats().landed, lens.len() as u64, "none counted twice");
}

#[test]
fn closing_during_gpu_transfers_is_clean() {
    if no_gpu() {
        return;
    }
    let len = 128 << 20;
    for closer in ["initiator", "target"] {
        let p = pair(config());
        let mut src = Mem::new(Side::Gpu, len);
        // Nonzero from the first byte on, so that arriving data shows in the destination.
        src.write(0, &vec![0x5a; len]);
        let dst = Mem::new(Side::Gpu, len);
        let smr = p.a.register(src.addr(), len).unwrap();
        let dmr = p.b.register(dst.addr(), len).unwrap();
        let remote = p.b.prepare_fifo(dmr, dst.addr(), len).unwrap();
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.addr(), len, remote }]).unwrap();
        let r = p.ba.recv(dmr, dst.addr(), len).unwrap();
        let s = p.ab.send(&[(smr, src.addr(), len)]).unwrap();
        // The close comes once data is moving (the first chunk landed), not at some guessed moment.
        common::wait_until("the first bytes land", PATIENCE, || dst.read(0, 1)[0] != 0);
        if closer == "initiator" {
            p.a.close_connection(&p.ab);
        } else {
            p.b.close_connection(&p.ba);
        }
        for (conn, id) in [(&p.ab, w), (&p.ab, s), (&p.ba, r)] {
            match wait(conn, id) {
                Ok(n) => assert_eq!(n, len as u64),
                Err(e) => assert!(
                    matches!(e.status(), UcclStatus::ErrCanceled | UcclStatus::ErrRemoteDisconnect),
                    "{closer} closed: {e}"
                ),
            }
        }
        // Memory can go once the transfers are over; the engines still work.
        drop((src, dst));
        let q = pair(config());
        let mut a = Mem::new(Side::Gpu, 4096);
        let b = Mem::new(Side::Gpu, 4096);
        a.write(0, &pattern(4096, 1));
        let amr = q.a.register(a.addr(), 4096).unwrap();
        let bmr = q.b.register(b.addr(), 4096).unwrap();
        let r = q.ba.recv(bmr, b.addr(), 4096).unwrap();
        let s = q.ab.send(&[(amr, a.addr(), 4096)]).unwrap();
        assert_eq!(wait(&q.ab, s).unwrap(), 4096);
        assert_eq!(wait(&q.ba, r).unwrap(), 4096);
        assert_same(&b.read(0, 4096), &pattern(4096, 1), "after a closed connection");
    }
}

#[test]
fn gpu_identity_in_metadata_and_handshake() {
    if no_gpu() {
        return;
    }
    make_current(None);
    let a = Engine::new(config()).unwrap();
    let b = Arc::new(Engine::new(config()).unwrap());
    assert!(b.gpu().is_none(), "no GPU current at creation, none registered");
    let cached = b.metadata();
    assert!(cached.ends_with("?0"), "no GPU known yet: {cached}");
    let buf = Mem::new(Side::Gpu, 4096);
    let host = Mem::new(Side::Host, 4096);
    b.register(host.addr(), host.len()).unwrap();
    assert!(b.gpu().is_none(), "host memory chooses no GPU");
    b.register(buf.addr(), buf.len()).unwrap();
    let gpu = b.gpu().expect("GPU chosen by the first device registration").clone();
    let bus_id = gpu.bus_id().to_owned();
    let fields: Vec<&str> = bus_id.split([':', '.']).collect();
    assert_eq!(fields.iter().map(|f| f.len()).collect::<Vec<_>>(), [4, 2, 2, 1], "PCI bus id form: {bus_id}");
    assert_eq!(b.metadata(), cached, "metadata changed after it was handed out");

    // Peers name the GPU by what the metadata said, by bus id, by ordinal or by another GPU's
    // name: the name is advisory, and the handshake says which GPU the engine really serves.
    let port = b.address().port();
    for name in ["0", bus_id.as_str(), "0000:ff:1f.7", "3"] {
        let conn = a.connect("127.0.0.1", name, port).unwrap_or_else(|e| panic!("GPU name {name:?}: {e}"));
        let accepted = common::accept(&b).unwrap();
        assert_eq!((conn.peer.gpu_index, conn.peer.gpu_id.as_str()), (0, bus_id.as_str()), "GPU name {name:?}");
        assert_eq!(accepted.peer.gpu_id, "0", "a has no GPU yet");
    }

    // An engine created with the GPU current knows it from the start, and says so in its metadata.
    make_current(Some(0));
    let current = Engine::new(config()).unwrap();
    make_current(None);
    assert_eq!(current.gpu().map(|g| g.bus_id().to_owned()), Some(bus_id.clone()));
    assert_eq!(current.metadata().rsplit_once('?').unwrap().1, bus_id);
    println!("engine metadata with a GPU: {}", current.metadata());

    // UCCL_TCPX_GPU chooses at creation and is checked.
    let chosen = Engine::new(Config { gpu: Some(0), ..config() }).unwrap();
    assert_eq!(chosen.gpu().map(|g| g.bus_id().to_owned()), Some(bus_id.clone()));
    assert!(chosen.metadata().ends_with(&bus_id));
    let err = Engine::new(Config { gpu: Some(999), ..config() }).err().expect("GPU 999 does not exist");
    assert!(err.message().contains("UCCL_TCPX_GPU=999") && err.message().contains("does not exist"), "{err}");
}

/// UCCL_TCPX_GPU, read from the environment as `uccl_engine_create` reads it, names the engine's
/// GPU even when another GPU is current on the creating thread; memory of the other GPU is then
/// refused with a message that says how to serve it.
#[test]
fn uccl_tcpx_gpu_wins_over_the_current_gpu() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    let env = |gpu: &'static str| {
        move |name: &str| match name {
            "UCCL_TCPX_GPU" => Some(gpu.to_owned()),
            "UCCL_TCPX_IP" => Some("127.0.0.1".to_owned()),
            _ => None,
        }
    };
    make_current(Some(0));
    let one = Arc::new(Engine::new(Config::from_lookup(env("1")).unwrap()).unwrap());
    make_current(None);
    let gpu1 = one.gpu().expect("UCCL_TCPX_GPU=1 chose at creation").clone();
    assert_eq!(gpu1.ordinal(), 1);
    assert_eq!(one.metadata().rsplit_once('?').unwrap().1, gpu1.bus_id());
    // Memory of another GPU is taken and leaves the served GPU as it was.
    let on0 = Mem::on_gpu(0, 4096);
    one.register(on0.addr(), on0.len()).unwrap();
    assert_eq!(one.gpu().unwrap().ordinal(), 1, "still GPU 1");
    let on1 = Mem::on_gpu(1, 1 << 20);
    let mr1 = one.register(on1.addr(), on1.len()).unwrap();

    // And it serves that GPU's memory: a peer on GPU 0 writes into it.
    make_current(Some(0));
    let zero = Engine::new(Config::from_lookup(env("0")).unwrap()).unwrap();
    make_current(None);
    assert_eq!(zero.gpu().unwrap().ordinal(), 0);
    let mut src = Mem::on_gpu(0, 1 << 20);
    let data = pattern(1 << 20, 21);
    src.write(0, &data);
    let smr = zero.register(src.addr(), src.len()).unwrap();
    let conn = connect_by_metadata(&zero, &one.metadata());
    let _served = common::accept(&one).unwrap();
    let remote = one.prepare_fifo(mr1, on1.addr(), on1.len()).unwrap();
    let w = conn.write(&[OneSided { mr: smr, addr: src.addr(), len: 1 << 20, remote }]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), 1 << 20);
    assert_same(&on1.read(0, 1 << 20), &data, "GPU 0 -> GPU 1 under UCCL_TCPX_GPU");
}

/// A connection whose GPU memory takes the same-host path (device copies, two engines of this
/// process) makes no staging ring as its channels come up; one whose GPU memory takes its channels
/// (no same-host identities) does. Counted by the process's ring tally (one test at a time).
#[test]
fn only_connections_whose_gpu_memory_takes_their_channels_make_rings_ahead() {
    use uccl_tcpx::internal::transport::staged::ring_counts;
    if no_gpu() {
        return;
    }
    for (cfg, stages) in [(common::same_host(), false), (config(), true)] {
        let a = Arc::new(Engine::new(Config { gpu: Some(0), ..cfg.clone() }).unwrap());
        let b = Arc::new(Engine::new(Config { gpu: Some(0), ..cfg }).unwrap());
        let before = ring_counts();
        let _ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let _ba = common::accept(&b).unwrap();
        let made = ring_counts().at_connect - before.at_connect;
        assert_eq!(made > 0, stages, "rings made as the channels came up: {made} (same-host path: {})", !stages);
    }
}

/// A connection's first transfers of GPU memory, of every kind and size, allocate nothing: the
/// staged comms made their rings as the connection was made (the engines knew their GPU from
/// creation), each ring readied its segment kernel then (NIXL's order: memory registered, which
/// builds the kernel, before connecting), and registration made the GPU's inline copier; the
/// sockets the comms add start no helper thread and grow no descriptor table. Counted by what the
/// library records making and what /proc shows, not by time (the suite runs one test at a time).
#[test]
fn a_connections_first_transfers_allocate_nothing() {
    use uccl_tcpx::internal::cuda::ring::kernels_readied_at_a_chunk;
    use uccl_tcpx::internal::cuda::small_copy::SmallCopier;
    use uccl_tcpx::internal::transport::staged::ring_counts;
    if no_gpu() {
        return;
    }
    let len = (4 << 20) + 64;
    let a = Arc::new(Engine::new(Config { gpu: Some(0), ..config() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(0), ..config() }).unwrap());
    let (mut a_mem, mut b_mem) = (Mem::on_gpu(0, len), Mem::on_gpu(0, len));
    let (amr, bmr) = (a.register(a_mem.addr(), len).unwrap(), b.register(b_mem.addr(), len).unwrap());
    let before_connect = ring_counts();
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = common::accept(&b).unwrap();
    let p = common::Pair { a, b, ab, ba };
    let (rings, copiers, kernels) = (ring_counts(), SmallCopier::made(), kernels_readied_at_a_chunk());
    let (threads, table, descriptors) =
        (common::socket_helpers(), testkit::cost::descriptor_table(), testkit::cost::descriptors());
    assert!(rings.at_connect > before_connect.at_connect, "the comms made their rings: {rings:?}");
    // Inline, eager and chunked sizes, each the first of its kind on this connection.
    for (k, size) in [4096usize, (64 << 10) + 1, 128 << 10, 256 << 10, 4 << 20].into_iter().enumerate() {
        for kind in [Kind::SendRecv, Kind::Write, Kind::Read] {
            let data = pattern(size, k as u64 * 3 + kind as u64);
            let (src, dst) = match kind {
                Kind::Read => ((&mut b_mem, bmr), (&mut a_mem, amr)),
                _ => ((&mut a_mem, amr), (&mut b_mem, bmr)),
            };
            src.0.write(1, &data);
            dst.0.clear();
            move_bytes(&p, kind, (&*src.0, src.1, 1), (&*dst.0, dst.1, 3), size);
            assert_same(&dst.0.read(3, size), &data, &format!("{kind:?} of {size} bytes"));
        }
    }
    // The first vector of many small pieces each way: gathered and scattered by the kernel where
    // it was built.
    let pieces = blocks(256, 4096, 8192, 16);
    let data = pattern(len, 5);
    a_mem.write(0, &data);
    b_mem.clear();
    let fifo = p.b.prepare_fifo(bmr, b_mem.addr(), len).unwrap();
    let items: Vec<OneSided> = pieces
        .iter()
        .map(|&(at, n)| OneSided {
            mr: amr,
            addr: a_mem.addr() + at,
            len: n,
            remote: FifoItem { addr: fifo.addr + at as u64, ..fifo },
        })
        .collect();
    let total = pieces.iter().map(|p| p.1 as u64).sum::<u64>();
    let w = p.ab.write(&items).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total);
    assert_same(&b_mem.read(0, len), &landed(&data, &pieces, &pieces, len), "the first vector");
    let after = ring_counts();
    assert_eq!(after.on_first_use, rings.on_first_use, "no staged comm made its ring at a transfer: {after:?}");
    assert_eq!(after.lanes_added, rings.lanes_added, "nor a lane");
    assert_eq!(SmallCopier::made(), copiers, "no inline copier was made at a transfer");
    assert_eq!(kernels_readied_at_a_chunk(), kernels, "no segment kernel was readied at a chunk");
    let added = testkit::cost::descriptors() - descriptors;
    assert_eq!(
        (common::socket_helpers(), testkit::cost::descriptor_table()),
        (threads, table),
        "a helper started or the table grew ({added} descriptors added)"
    );
}

/// Memory of the GPU an engine does not serve, on both ends (engine a serves GPU 1 with memory on
/// GPU 0, b the other way round), every transfer kind over the network path: inline copies run in
/// the memory's GPU's context, staged chunks on that GPU's lane of each comm's ring. Byte for byte.
#[test]
fn memory_of_the_other_gpu_every_kind_every_size() {
    use uccl_tcpx::internal::transport::staged::ring_counts;
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    let a = Arc::new(Engine::new(Config { gpu: Some(1), ..config() }).unwrap());
    let b = Arc::new(Engine::new(Config { gpu: Some(0), ..config() }).unwrap());
    let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
    let ba = common::accept(&b).unwrap();
    let p = common::Pair { a, b, ab, ba };
    let sizes = [1usize, 4097, 65_537, (1 << 20) - 3, (4 << 20) + 17];
    let max = sizes.iter().max().unwrap() + 64;
    let lanes = ring_counts().lanes_added;
    for kind in [Kind::SendRecv, Kind::Write, Kind::Read] {
        // For reads the source lives on b, the destination on a.
        let (src_engine, dst_engine) = match kind {
            Kind::Read => (&p.b, &p.a),
            _ => (&p.a, &p.b),
        };
        let other = |e: &Engine| 1 - e.gpu().unwrap().ordinal();
        let (mut src, mut dst) = (Mem::on_gpu(other(src_engine), max), Mem::on_gpu(other(dst_engine), max));
        let smr = src_engine.register(src.addr(), max).unwrap();
        let dmr = dst_engine.register(dst.addr(), max).unwrap();
        for (k, &len) in sizes.iter().enumerate() {
            let (soff, doff) = (1 + (k * 3) % 13, 5 + k % 3);
            let data = pattern(len, (k * 10 + kind as usize) as u64);
            src.write(soff, &data);
            dst.clear();
            move_bytes(&p, kind, (&src, smr, soff), (&dst, dmr, doff), len);
            let got = dst.read(doff - 1, len + 2);
            let what = format!("{kind:?} of {len} bytes between the GPUs the engines do not serve");
            assert_same(&got[1..=len], &data, &what);
            assert_eq!((got[0], got[len + 1]), (0, 0), "{what}: neighbours untouched");
        }
        src_engine.deregister(smr).unwrap();
        dst_engine.deregister(dmr).unwrap();
    }
    assert!(ring_counts().lanes_added > lanes, "chunks were staged on lanes of the memory's GPUs");
    assert_eq!((p.a.gpu().unwrap().ordinal(), p.b.gpu().unwrap().ordinal()), (1, 0), "the served GPUs stay");
}

/// NIXL's order of calls with one agent per GPU: each engine is created on a thread whose current
/// GPU is the agent's (`torch.cuda.set_device`), its metadata read at once and cached, device
/// memory registered only afterwards, and each side connects with the other's cached metadata.
/// A third engine is created with no GPU current, so its cached metadata says GPU "0" while its
/// registration makes it serve GPU 1: peers holding that string still connect.
#[test]
fn nixl_order_one_engine_per_gpu() {
    if no_gpu() || fewer_gpus_than(2) {
        return;
    }
    make_current(Some(0));
    let a = Arc::new(Engine::new(config()).unwrap());
    let meta_a = a.metadata();
    make_current(Some(1));
    let b = Arc::new(Engine::new(config()).unwrap());
    let meta_b = b.metadata();
    make_current(None);
    let c = Arc::new(Engine::new(config()).unwrap());
    let meta_c = c.metadata();
    let (bus0, bus1) = (a.gpu().unwrap().bus_id().to_owned(), b.gpu().unwrap().bus_id().to_owned());
    assert_eq!(a.gpu().unwrap().ordinal(), 0);
    assert_eq!(b.gpu().unwrap().ordinal(), 1, "the creating thread's current GPU");
    assert!(meta_a.ends_with(&format!("?{bus0}")) && meta_b.ends_with(&format!("?{bus1}")), "{meta_a} {meta_b}");
    assert!(c.gpu().is_none() && meta_c.ends_with("?0"), "{meta_c}");

    let len = (8 << 20) + 13;
    let mut mem_a = Mem::on_gpu(0, len);
    let mut mem_b = Mem::on_gpu(1, len);
    let mut mem_c = Mem::on_gpu(1, len);
    let mr_a = a.register(mem_a.addr(), len).unwrap();
    let mr_b = b.register(mem_b.addr(), len).unwrap();
    let mr_c = c.register(mem_c.addr(), len).unwrap();
    assert_eq!(c.gpu().unwrap().bus_id(), bus1, "c learned GPU 1 from its registration");
    for (engine, cached) in [(&a, &meta_a), (&b, &meta_b), (&c, &meta_c)] {
        assert_eq!(&engine.metadata(), cached, "metadata changed after it was handed out");
    }

    // Both directions, as two NIXL agents each load the other's metadata.
    let ab = connect_by_metadata(&a, &meta_b);
    let _b_from_a = common::accept(&b).unwrap();
    let ba = connect_by_metadata(&b, &meta_a);
    let _a_from_b = common::accept(&a).unwrap();
    let ac = connect_by_metadata(&a, &meta_c);
    let _c_from_a = common::accept(&c).unwrap();
    assert_eq!(ab.peer.gpu_id, bus1);
    assert_eq!(ba.peer.gpu_id, bus0);
    assert_eq!(ac.peer.gpu_id, bus1, "c serves GPU 1 although its metadata says 0");

    // Write a pattern into the peer's GPU, read it back into ours, byte for byte.
    let mut round = 0;
    for (conn, peer, remote_mem, remote_mr) in [(&ab, &b, &mut mem_b, mr_b), (&ac, &c, &mut mem_c, mr_c)] {
        round += 1;
        let data = pattern(len - 8, round);
        mem_a.write(3, &data);
        let mut remote = peer.prepare_fifo(remote_mr, remote_mem.addr(), len).unwrap();
        remote.addr += 5;
        let w = conn.write(&[OneSided { mr: mr_a, addr: mem_a.addr() + 3, len: len - 8, remote }]).unwrap();
        assert_eq!(wait(conn, w).unwrap(), (len - 8) as u64);
        assert_same(&remote_mem.read(5, len - 8), &data, &format!("write {round} into GPU 1"));
        mem_a.clear();
        let r = conn.read(&[OneSided { mr: mr_a, addr: mem_a.addr() + 1, len: len - 8, remote }]).unwrap();
        assert_eq!(wait(conn, r).unwrap(), (len - 8) as u64);
        assert_same(&mem_a.read(1, len - 8), &data, &format!("read {round} back from GPU 1"));
        remote_mem.clear();
    }
    let data = pattern(len, 9);
    mem_b.write(0, &data);
    let remote = a.prepare_fifo(mr_a, mem_a.addr(), len).unwrap();
    let w = ba.write(&[OneSided { mr: mr_b, addr: mem_b.addr(), len, remote }]).unwrap();
    assert_eq!(wait(&ba, w).unwrap(), len as u64);
    assert_same(&mem_a.read(0, len), &data, "write from GPU 1 into GPU 0");
}

#[test]
fn host_memory_without_a_driver() {
    // Runs everywhere; without libcuda it is the proof that nothing calls into CUDA.
    if !cuda::available() {
        assert_eq!(cuda::locate(0x7f12_3400_0000, 1 << 20).unwrap(), cuda::Location::Host);
        let err = cuda::DeviceBuffer::new(0, 64).unwrap_err();
        assert!(err.message().contains("CUDA unavailable"), "{err}");
        let err = Engine::new(Config { gpu: Some(0), ..config() }).err().expect("UCCL_TCPX_GPU needs CUDA");
        assert!(err.message().contains("CUDA unavailable"), "{err}");
    }
    let p = pair(config());
    let len = (3 << 20) + 3;
    let src = pattern(len, 8);
    let mut dst = vec![0u8; len];
    assert_eq!(cuda::locate(src.as_ptr() as usize, len).unwrap(), cuda::Location::Host);
    let smr = p.a.register(src.as_ptr() as usize, len).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, len).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, len).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, len)]).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), len as u64);
    assert_eq!(wait(&p.ba, r).unwrap(), len as u64);
    assert_same(&dst, &src, "host send/recv");
    let mut back = vec![0u8; len];
    let bmr = p.a.register(back.as_mut_ptr() as usize, len).unwrap();
    let fifo = p.b.prepare_fifo(dmr, dst.as_ptr() as usize, len).unwrap();
    let rd = p.ab.read(&[OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len, remote: fifo }]).unwrap();
    assert_eq!(wait(&p.ab, rd).unwrap(), len as u64);
    assert_same(&back, &src, "host read");
    assert!(p.a.gpu().is_none() && p.b.gpu().is_none(), "host memory never chooses a GPU");
    assert!(p.a.metadata().ends_with("?0"));
}

// ---- two processes on one GPU -------------------------------------------------------------------

const PEER_REGION: usize = (64 << 20) + 64;
const PEER_SEED: u64 = 77;
const ECHO_LEN: usize = (8 << 20) + 13;

/// The peer: an engine with a GPU region holding a known pattern, advertised whole; prints its
/// port, metadata and FifoItem, echoes one message received into GPU memory, then serves until
/// killed.
#[test]
#[ignore = "started by two_processes_share_one_gpu as its peer process"]
fn gpu_peer_process() {
    assert!(common::is_child("gpu_peer_process"), "runs as the peer process of two_processes_share_one_gpu");
    let engine = std::sync::Arc::new(Engine::new(config()).unwrap());
    let mut region = Mem::new(Side::Gpu, PEER_REGION);
    region.write(0, &pattern(PEER_REGION, PEER_SEED));
    let mr = engine.register(region.addr(), region.len()).unwrap();
    let item = engine.prepare_fifo(mr, region.addr(), region.len()).unwrap();
    println!("PEER {} {} {}", engine.address().port(), engine.metadata(), common::engine::fifo_to_hex(&item));
    let conn = common::accept(&engine).unwrap();
    let echo = Mem::new(Side::Gpu, ECHO_LEN);
    let emr = engine.register(echo.addr(), echo.len()).unwrap();
    let r = conn.recv(emr, echo.addr(), ECHO_LEN).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), ECHO_LEN as u64);
    let s = conn.send(&[(emr, echo.addr(), ECHO_LEN)]).unwrap();
    assert_eq!(wait(&conn, s).unwrap(), ECHO_LEN as u64);
    testkit::child::park_until_killed()
}

struct Peer {
    _process: testkit::child::Peer,
    port: u16,
    gpu: String,
    item: FifoItem,
}

impl Peer {
    fn spawn() -> Peer {
        let mut process = ChildTest::new("gpu_peer_process").ignored().spawn();
        let line = process.announcement("PEER ", Duration::from_secs(120));
        let parts: Vec<&str> = line.split_whitespace().collect();
        let port = parts[0].parse().unwrap();
        let gpu = parts[1].rsplit_once('?').unwrap().1.to_owned();
        Peer { _process: process, port, gpu, item: common::engine::fifo_from_hex(parts[2]) }
    }
}

#[test]
fn two_processes_share_one_gpu() {
    if no_gpu() {
        return;
    }
    let peer = Peer::spawn();
    let engine = Engine::new(config()).unwrap();
    let mut local = Mem::new(Side::Gpu, PEER_REGION);
    let mr = engine.register(local.addr(), local.len()).unwrap();
    assert_eq!(engine.gpu().unwrap().bus_id(), peer.gpu, "both processes see the same GPU");
    // The peer's metadata names its GPU by PCI bus id; connect with exactly that.
    let conn = engine.connect("127.0.0.1", &peer.gpu, peer.port).unwrap();
    assert_eq!(conn.peer.gpu_id, peer.gpu);
    let expected = pattern(PEER_REGION, PEER_SEED);

    // Read most of the peer's GPU region into ours, at odd offsets on both ends.
    let len = PEER_REGION - 64;
    let mut remote = peer.item;
    remote.addr += 5;
    let r = conn.read(&[OneSided { mr, addr: local.addr() + 3, len, remote }]).unwrap();
    assert_eq!(wait(&conn, r).unwrap(), len as u64);
    assert_same(&local.read(3, len), &expected[5..5 + len], "read from the other process's GPU");

    // Write a new pattern into part of it, then read that back.
    let wlen = (3 << 20) + 7;
    let fresh = pattern(wlen, 5);
    local.write(1, &fresh);
    let mut target = peer.item;
    target.addr += (1 << 20) + 1;
    let w = conn.write(&[OneSided { mr, addr: local.addr() + 1, len: wlen, remote: target }]).unwrap();
    assert_eq!(wait(&conn, w).unwrap(), wlen as u64);
    local.clear();
    let r = conn
        .read(&[OneSided {
            mr,
            addr: local.addr(),
            len: wlen + 2,
            remote: {
                let mut around = peer.item;
                around.addr += 1 << 20;
                around
            },
        }])
        .unwrap();
    assert_eq!(wait(&conn, r).unwrap(), (wlen + 2) as u64);
    let got = local.read(0, wlen + 2);
    assert_same(&got[1..=wlen], &fresh, "write into the other process's GPU");
    assert_eq!(got[0], expected[1 << 20], "byte before the write untouched");
    assert_eq!(got[wlen + 1], expected[(1 << 20) + 1 + wlen], "byte after the write untouched");

    // Two-sided: GPU -> peer GPU -> back into host memory.
    let msg = pattern(ECHO_LEN, 6);
    local.write(0, &msg);
    let mut back = vec![0u8; ECHO_LEN];
    let bmr = engine.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let r = conn.recv(bmr, back.as_mut_ptr() as usize, ECHO_LEN).unwrap();
    let s = conn.send(&[(mr, local.addr(), ECHO_LEN)]).unwrap();
    assert_eq!(wait(&conn, s).unwrap(), ECHO_LEN as u64);
    assert_eq!(wait(&conn, r).unwrap(), ECHO_LEN as u64);
    assert_same(&back, &msg, "echo through the other process's GPU");
}
