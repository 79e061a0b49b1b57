//! The plugin transport against the fake devmem NIC (`crates/fake-tcpx`, host mode): every received
//! byte lands in shuffled pages of a bounce pool and must be gathered from `loadMeta` lists, and the
//! fake answers any broken TCPX rule with rc 3, which would fail these transfers. The whole engine
//! runs with the tcpx transport (configured through `Config`, so nothing here touches the process
//! environment); the transport-level cases drive the comms directly.

use std::sync::Arc;
use std::time::Duration;

use uccl_tcpx::internal::transport::plugin::PluginNet;
use uccl_tcpx::internal::transport::{ListenComm, MrHandle, Net, RecvComm, RequestId, SendComm};
use uccl_tcpx::{Config, Connection, Engine, OneSided, UcclStatus};

mod common;
use common::{PATIENCE, Pair, TRANSFER_LIMIT, drive, pattern, wait};

/// "No registration": the transport registers the buffer for that one request (`MrHandle::NONE`).
const NONE: MrHandle = MrHandle(0);

use common::plugin::config;

fn pair_with(config: Config) -> Pair {
    let p = common::pair(config);
    assert_eq!(p.a.transport(), "FakeDevmemTCPX_v7");
    p
}

fn pair() -> Pair {
    // Three channels over the fake's three devices (no GPU in host mode to pair them with).
    pair_with(config(3, 256 << 10))
}

/// Sends each buffer as one message from `tx` to `rx` and checks every byte.
fn send_all(tx: (&Engine, &Connection), rx: (&Engine, &Connection), sizes: &[usize], seed: u64) {
    let srcs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, seed + i as u64)).collect();
    let mut dsts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n + 64]).collect();
    let mut recvs = Vec::new();
    for d in dsts.iter_mut() {
        let mr = rx.0.register(d.as_mut_ptr() as usize, d.len()).unwrap();
        recvs.push(rx.1.recv(mr, d.as_mut_ptr() as usize, d.len()).unwrap());
    }
    let mut sends = Vec::new();
    for s in &srcs {
        let mr = tx.0.register(s.as_ptr() as usize, s.len()).unwrap();
        sends.push(tx.1.send(&[(mr, s.as_ptr() as usize, s.len())]).unwrap());
    }
    for (i, id) in sends.into_iter().enumerate() {
        assert_eq!(wait(tx.1, id).unwrap(), sizes[i] as u64, "send {i}");
    }
    for (i, id) in recvs.into_iter().enumerate() {
        assert_eq!(wait(rx.1, id).unwrap(), sizes[i] as u64, "receive {i}");
        assert!(dsts[i][..sizes[i]] == srcs[i][..], "message {i} of {} bytes differs", sizes[i]);
        assert!(dsts[i][sizes[i]..].iter().all(|b| *b == 0), "bytes past message {i} untouched");
    }
}

#[test]
fn send_recv_of_many_sizes_gathers_every_byte() {
    let p = pair();
    let sizes = [1usize, 100, 4095, 4096, 4097, 256 << 10, (256 << 10) + 1, (3 << 20) + 7];
    send_all((&p.a, &p.ab), (&p.b, &p.ba), &sizes, 1);
}

#[test]
fn receives_of_exactly_four_mib() {
    let p = pair_with(config(2, 4 << 20));
    send_all((&p.a, &p.ab), (&p.b, &p.ba), &[4 << 20, 12 << 20, (4 << 20) - 1], 7);
}

#[test]
fn a_large_transfer_holds_every_window_at_its_limit() {
    // 32 MiB in 64 KiB chunks over two channels: 256 chunks per comm, always 16 in flight.
    let p = pair_with(config(2, 64 << 10));
    send_all((&p.a, &p.ab), (&p.b, &p.ba), &[32 << 20], 11);
}

#[test]
fn one_sided_writes_and_reads_with_vectors() {
    let p = pair();
    let mut target = vec![0u8; 2 << 20];
    let tmr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let base = target.as_mut_ptr() as usize;
    let fifo = p.b.prepare_fifo(tmr, base, target.len()).unwrap();
    let src = pattern(1 << 20, 21);
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let mut second = fifo;
    second.addr += (1 << 20) + 5;
    let items = [
        OneSided { mr: smr, addr: src.as_ptr() as usize, len: 300_000, remote: fifo },
        OneSided { mr: smr, addr: src.as_ptr() as usize + 300_000, len: 700_001, remote: second },
    ];
    let w = p.ab.write(&items).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), 1_000_001);
    assert!(target[..300_000] == src[..300_000]);
    assert!(target[(1 << 20) + 5..(1 << 20) + 5 + 700_001] == src[300_000..1_000_001]);

    let mut back = vec![0u8; 1_000_001];
    let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let reads = [
        OneSided { mr: bmr, addr: back.as_mut_ptr() as usize, len: 300_000, remote: fifo },
        OneSided { mr: bmr, addr: back.as_mut_ptr() as usize + 300_000, len: 700_001, remote: second },
    ];
    let r = p.ab.read(&reads).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), 1_000_001);
    assert!(back[..] == src[..1_000_001]);

    let mut forged = fifo;
    forged.padding[9] ^= 0x40;
    let w = p.ab.write(&[OneSided { mr: smr, addr: src.as_ptr() as usize, len: 8, remote: forged }]).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap_err().status(), UcclStatus::ErrNotAllowed);
}

/// A vector of many scattered items is one request and one flow, whose chunks span items (each
/// gathered into one plugin request and scattered on arrival): items smaller and larger than a chunk.
#[test]
fn scattered_vectors_span_items() {
    let p = pair_with(config(2, 64 << 10));
    vector_across_items(&p, 60, 160 << 10, &[1, 4097, 65_536, 100_001, 777]);
}

/// The same below a full chunk per channel: 4.4 MB over 3 channels of 4 MiB chunks is cut in
/// shares of 1.4 MiB, across items.
#[test]
fn spread_vectors_span_items() {
    let p = pair_with(config(3, 4 << 20));
    vector_across_items(&p, 8, 2 << 20, &[1, 1_500_001, 4097, 700_000]);
}

fn vector_across_items(p: &Pair, count: usize, slot: usize, lens: &[usize]) {
    let spans: Vec<(usize, usize, usize)> =
        (0..count).map(|i| (((i * 7) % count) * slot, ((i * 11) % count) * slot, lens[i % lens.len()])).collect();
    let total: usize = spans.iter().map(|s| s.2).sum();
    let src = pattern(count * slot, 22);
    let mut target = vec![0u8; count * slot];
    let tmr = p.b.register(target.as_mut_ptr() as usize, target.len()).unwrap();
    let fifo = p.b.prepare_fifo(tmr, target.as_mut_ptr() as usize, target.len()).unwrap();
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let items = |base: usize, mr: u64| -> Vec<OneSided> {
        spans
            .iter()
            .map(|&(lo, ro, len)| {
                let mut remote = fifo;
                remote.addr += ro as u64;
                OneSided { mr, addr: base + lo, len, remote }
            })
            .collect()
    };
    let w = p.ab.write(&items(src.as_ptr() as usize, smr)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total as u64);
    let mut back = vec![0u8; count * slot];
    let bmr = p.a.register(back.as_mut_ptr() as usize, back.len()).unwrap();
    let r = p.ab.read(&items(back.as_mut_ptr() as usize, bmr)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total as u64);
    for &(lo, ro, len) in &spans {
        assert!(target[ro..ro + len] == src[lo..lo + len], "written item at {ro}");
        assert!(back[lo..lo + len] == src[lo..lo + len], "read item at {lo}");
    }
}

#[test]
fn vector_sends_and_notifications() {
    let p = pair();
    let parts: Vec<Vec<u8>> =
        [5000usize, 1, 300_000].iter().enumerate().map(|(i, &n)| pattern(n, 40 + i as u64)).collect();
    let mut dsts: Vec<Vec<u8>> = parts.iter().map(|s| vec![0u8; s.len()]).collect();
    let recvs: Vec<u64> = dsts
        .iter_mut()
        .map(|d| {
            let mr = p.b.register(d.as_mut_ptr() as usize, d.len()).unwrap();
            p.ba.recv(mr, d.as_mut_ptr() as usize, d.len()).unwrap()
        })
        .collect();
    let items: Vec<(u64, usize, usize)> = parts
        .iter()
        .map(|s| (p.a.register(s.as_ptr() as usize, s.len()).unwrap(), s.as_ptr() as usize, s.len()))
        .collect();
    let s = p.ab.send(&items).unwrap();
    assert_eq!(wait(&p.ab, s).unwrap(), 305_001);
    for (i, r) in recvs.into_iter().enumerate() {
        assert_eq!(wait(&p.ba, r).unwrap(), parts[i].len() as u64);
        assert_eq!(dsts[i], parts[i]);
    }

    p.ab.notify(b"plugin-conformance", b"after the data").unwrap();
    let mut got = Vec::new();
    common::wait_until("the notification arrives", PATIENCE, || {
        got.extend(uccl_tcpx::drain_notifications(64).into_iter().filter(|n| n.name == b"plugin-conformance"));
        !got.is_empty()
    });
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].msg, b"after the data");
}

#[test]
fn interleaved_transfers_in_both_directions() {
    let p = Arc::new(pair());
    let sizes: Vec<usize> = (0..24).map(|i| 1 + (i * 97_003) % (1 << 20)).collect();
    let (p1, s1) = (p.clone(), sizes.clone());
    let there = std::thread::spawn(move || send_all((&p1.a, &p1.ab), (&p1.b, &p1.ba), &s1, 100));
    let back = std::thread::spawn({
        let p = p.clone();
        move || send_all((&p.b, &p.ba), (&p.a, &p.ab), &sizes, 200)
    });
    there.join().unwrap();
    back.join().unwrap();
}

#[test]
fn connections_come_up_while_others_transfer() {
    // Handshake threads (connect, accept, the channels' first calls) and the progress thread all
    // reach the one plugin of the process at once here; its calls must still come one at a time
    // (the strict fake ends the process otherwise), and every connection must move its data.
    let p = Arc::new(pair_with(config(2, 128 << 10)));
    let busy = std::thread::spawn({
        let p = p.clone();
        move || {
            let sizes: Vec<usize> = (0..16).map(|i| 1 + (i * 131_071) % (1 << 20)).collect();
            send_all((&p.a, &p.ab), (&p.b, &p.ba), &sizes, 300);
        }
    });
    let joiners: Vec<_> = (0..3)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                let c = Engine::new(config(2, 128 << 10)).unwrap();
                let cb = c.connect("127.0.0.1", "0", p.b.address().port()).unwrap();
                (c, cb)
            })
        })
        .collect();
    // Accepts pop in any order, so every new connection carries the same bytes both ways.
    let accepted: Vec<_> = (0..3).map(|_| common::accept(&p.b).unwrap()).collect();
    let linked: Vec<_> = joiners.into_iter().map(|j| j.join().unwrap()).collect();
    busy.join().unwrap();
    let src = pattern(700_000, 400);
    let mut dsts: Vec<Vec<u8>> = (0..6).map(|_| vec![0u8; src.len()]).collect();
    let mut recvs = Vec::new();
    let (c_side, b_side) = dsts.split_at_mut(3);
    for ((c, cb), dst) in linked.iter().zip(c_side) {
        let mr = c.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        recvs.push((cb.clone(), cb.recv(mr, dst.as_mut_ptr() as usize, dst.len()).unwrap()));
    }
    for (bc, dst) in accepted.iter().zip(b_side) {
        let mr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
        recvs.push((bc.clone(), bc.recv(mr, dst.as_mut_ptr() as usize, dst.len()).unwrap()));
    }
    let mut sends = Vec::new();
    let bmr = p.b.register(src.as_ptr() as usize, src.len()).unwrap();
    for bc in &accepted {
        sends.push((bc.clone(), bc.send(&[(bmr, src.as_ptr() as usize, src.len())]).unwrap()));
    }
    for (c, cb) in &linked {
        let mr = c.register(src.as_ptr() as usize, src.len()).unwrap();
        sends.push((cb.clone(), cb.send(&[(mr, src.as_ptr() as usize, src.len())]).unwrap()));
    }
    for (conn, id) in sends.iter().chain(&recvs) {
        assert_eq!(wait(conn, *id).unwrap(), src.len() as u64);
    }
    assert!(dsts.iter().all(|d| *d == src), "every connection delivered the bytes");
}

/// A sparse anonymous mapping: only the pages a test touches take memory.
struct Sparse {
    ptr: *mut u8,
    len: usize,
}

impl Sparse {
    fn new(len: usize) -> Sparse {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping, unmapped on drop.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of {len} bytes: {}", std::io::Error::last_os_error());
        Sparse { ptr: ptr.cast(), len }
    }

    fn at(&self, off: usize) -> usize {
        self.ptr as usize + off
    }

    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn transfers_anywhere_in_six_gib_regions() {
    // ncclNet v7's regMr takes an int size: each channel registers windows of the regions below 2 GiB,
    // on demand, so writes, reads and sends reach every part of a 6 GiB registration.
    const GIB: usize = 1 << 30;
    let p = pair_with(config(2, 1 << 20));
    let (mut src, dst) = (Sparse::new(6 * GIB), Sparse::new(6 * GIB));
    let smr = p.a.register(src.at(0), src.len).unwrap();
    let dmr = p.b.register(dst.at(0), dst.len).unwrap();
    // A FifoItem advertises less than 4 GiB: the target advertises its two halves.
    let halves = [0, 3 * GIB].map(|off| (off, p.b.prepare_fifo(dmr, dst.at(off), 3 * GIB).unwrap()));
    let fifo_for = |off: usize| halves.iter().rev().find(|(start, _)| off >= *start).unwrap().1;
    // (source offset, destination offset, length): the start, across the 1 and 2 GiB marks, the end.
    let moves = [
        (0, 5 * GIB + 4097, 3 << 20),
        (2 * GIB - (3 << 20) - 5, GIB - (1 << 20), 6 << 20),
        (6 * GIB - (5 << 20), 2 * GIB - (2 << 20) + 1, 5 << 20),
        (4 * GIB + 12_345, 6 * GIB - (2 << 20), 2 << 20),
    ];
    for (i, &(from, to, len)) in moves.iter().enumerate() {
        src.slice_mut(from, len).copy_from_slice(&pattern(len, 600 + i as u64));
        let mut remote = fifo_for(to);
        remote.addr = dst.at(to) as u64;
        let w = p.ab.write(&[OneSided { mr: smr, addr: src.at(from), len, remote }]).unwrap();
        assert_eq!(wait(&p.ab, w).unwrap(), len as u64, "write {i}");
        assert!(dst.slice(to, len) == src.slice(from, len), "write {i} landed");
    }
    // Reads back from the far end of the target into the far end of the source region.
    let back = (5 * GIB + (7 << 20), 3 << 20);
    let mut remote = fifo_for(5 * GIB + 4097);
    remote.addr = dst.at(5 * GIB + 4097) as u64;
    let r = p.ab.read(&[OneSided { mr: smr, addr: src.at(back.0), len: back.1, remote }]).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), back.1 as u64);
    assert!(src.slice(back.0, back.1) == &pattern(3 << 20, 600)[..]);
    // A message received at the very end of the 6 GiB registration.
    let at = 6 * GIB - (3 << 20);
    let rx = p.ba.recv(dmr, dst.at(at), 3 << 20).unwrap();
    let tx = p.ab.send(&[(smr, src.at(back.0), back.1)]).unwrap();
    assert_eq!(wait(&p.ab, tx).unwrap(), back.1 as u64);
    assert_eq!(wait(&p.ba, rx).unwrap(), back.1 as u64);
    assert!(dst.slice(at, 3 << 20) == &pattern(3 << 20, 600)[..]);

    // KV-cache blocks scattered over both whole regions: every chunk of the vector spans pieces
    // in several registration windows on each end.
    let blocks: Vec<(usize, usize, usize)> = (0..96)
        .map(|i| ((i * 37 % 96) * (GIB / 16) + 5 * i, (i * 53 % 96) * (GIB / 16) + 3 * i, 16_384 + 777 * (i % 5)))
        .collect();
    for (i, &(from, _, len)) in blocks.iter().enumerate() {
        src.slice_mut(from, len).copy_from_slice(&pattern(len, 700 + i as u64));
    }
    let items = |base: &Sparse| -> Vec<OneSided> {
        blocks
            .iter()
            .map(|&(from, to, len)| {
                let mut remote = fifo_for(to);
                remote.addr = dst.at(to) as u64;
                OneSided { mr: smr, addr: base.at(from), len, remote }
            })
            .collect()
    };
    let total: usize = blocks.iter().map(|b| b.2).sum();
    let w = p.ab.write(&items(&src)).unwrap();
    assert_eq!(wait(&p.ab, w).unwrap(), total as u64, "scattered write");
    for &(from, to, len) in &blocks {
        assert!(dst.slice(to, len) == src.slice(from, len), "block at {to} landed");
    }
    for &(from, _, len) in &blocks {
        src.slice_mut(from, len).fill(0);
    }
    let r = p.ab.read(&items(&src)).unwrap();
    assert_eq!(wait(&p.ab, r).unwrap(), total as u64, "scattered read");
    for &(from, to, len) in &blocks {
        assert!(src.slice(from, len) == dst.slice(to, len), "block read back into {from}");
    }
}

#[test]
fn zero_byte_engine_messages_are_refused_cleanly() {
    let p = pair();
    let buf = [0u8; 16];
    let mr = p.a.register(buf.as_ptr() as usize, buf.len()).unwrap();
    let err = p.ab.send(&[(mr, buf.as_ptr() as usize, 0)]).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{err}");
    send_all((&p.a, &p.ab), (&p.b, &p.ba), &[16], 3);
}

#[test]
fn peer_closing_mid_transfer_fails_the_transfer_without_hanging() {
    let p = pair_with(Config { timeout: Duration::from_secs(10), ..config(2, 64 << 10) });
    let src = pattern(64 << 20, 9);
    let mut dst = vec![0u8; src.len()];
    let smr = p.a.register(src.as_ptr() as usize, src.len()).unwrap();
    let dmr = p.b.register(dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let r = p.ba.recv(dmr, dst.as_mut_ptr() as usize, dst.len()).unwrap();
    let s = p.ab.send(&[(smr, src.as_ptr() as usize, src.len())]).unwrap();
    // Wait until bytes are arriving, then close the receiving side.
    common::wait_until("data arrives", PATIENCE, || {
        // SAFETY: a live buffer; the engine's threads write it, so the read must be repeated.
        (0..1 << 20).any(|i| unsafe { std::ptr::read_volatile(dst.as_ptr().add(i)) } != 0)
    });
    let started = std::time::Instant::now();
    p.b.close_connection(&p.ba);
    assert_eq!(wait(&p.ba, r).unwrap_err().status(), UcclStatus::ErrCanceled);
    let err = wait(&p.ab, s).expect_err("the sender learns of the close");
    assert!(
        matches!(err.status(), UcclStatus::ErrRemoteDisconnect | UcclStatus::ErrTimeout | UcclStatus::ErrBackend),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "failed within bounds: {:?}", started.elapsed());
    drop(p.a);
}

/// One comm each way over the fake, without the engine.
struct Link {
    send: Box<dyn SendComm>,
    recv: Box<dyn RecvComm>,
    _listen: Box<dyn ListenComm>,
}

fn link(net: &PluginNet, dev: usize) -> Link {
    let (send, recv, listen) = common::comm::comm_pair(net, dev);
    Link { send, recv, _listen: listen }
}

fn transport() -> PluginNet {
    PluginNet::open(&config(1, 1 << 20), None).unwrap()
}

fn finish<T>(mut poll: impl FnMut() -> uccl_tcpx::Result<Option<T>>) -> T {
    drive("the request completes", TRANSFER_LIMIT, || poll().unwrap())
}

#[test]
fn transport_zero_byte_and_four_mib_messages() {
    let net = transport();
    let mut l = link(&net, 1);
    let src = pattern(4 << 20, 77);
    let mut big = vec![0u8; 4 << 20];
    let mut none = [0u8; 0];
    // SAFETY: a zero-byte receive names no bytes; none lives to the end of the test anyway.
    let r0 = unsafe { l.recv.irecv(none.as_mut_ptr(), 0, NONE) }.unwrap().unwrap();
    // SAFETY: big is a live 4 MiB Vec, read only after r1 is reported done below.
    let r1 = unsafe { l.recv.irecv(big.as_mut_ptr(), big.len(), NONE) }.unwrap().unwrap();
    // SAFETY: a zero-byte send reads no bytes; src lives to the end of the test anyway.
    let s0 = unsafe { l.send.isend(src.as_ptr(), 0, NONE) }.unwrap().unwrap();
    // SAFETY: src is a live 4 MiB Vec, and s1 is tested to completion below.
    let s1 = unsafe { l.send.isend(src.as_ptr(), src.len(), NONE) }.unwrap().unwrap();
    let mut sent = Vec::new();
    let mut got = Vec::new();
    // Progress happens only inside test: poll both sides, oldest first.
    drive("both messages complete", TRANSFER_LIMIT, || {
        if let Some(&s) = [s0, s1].get(sent.len())
            && let Some(n) = l.send.test(s).unwrap()
        {
            sent.push(n);
        }
        if let Some(&r) = [r0, r1].get(got.len())
            && let Some(n) = l.recv.test(r).unwrap()
        {
            got.push(n);
        }
        (sent.len() == 2 && got.len() == 2).then_some(())
    });
    assert_eq!(sent, vec![0, 4 << 20]);
    assert_eq!(got, vec![0, 4 << 20]);
    assert!(big == src);
    l.recv.irecv_consumed(r0).unwrap();
    l.recv.irecv_consumed(r1).unwrap();
    assert!(!net.needs_polling());
}

#[test]
fn transport_window_of_sixteen_with_unconsumed_receives() {
    let net = transport();
    let mut l = link(&net, 0);
    let srcs: Vec<Vec<u8>> = (0..16).map(|i| pattern(10_000 + i * 1000, i as u64)).collect();
    let mut dsts: Vec<Vec<u8>> = (0..17).map(|_| vec![0u8; 30_000]).collect();
    let recvs: Vec<RequestId> = dsts[..16]
        .iter_mut()
        // SAFETY: each d is a live 30,000-byte Vec in dsts, read only after its receive is reported done
        // below.
        .map(|d| unsafe { l.recv.irecv(d.as_mut_ptr(), d.len(), NONE) }.unwrap().unwrap())
        .collect();
    // SAFETY: dsts[16] is a live Vec; the window is full, so the receive is refused and nothing keeps the
    // pointer.
    assert_eq!(unsafe { l.recv.irecv(dsts[16].as_mut_ptr(), 100, NONE) }.unwrap(), None);
    let sends: Vec<RequestId> =
        // SAFETY: each s is a live Vec in srcs, and every send is tested to completion below.
        srcs.iter().map(|s| unsafe { l.send.isend(s.as_ptr(), s.len(), NONE) }.unwrap().unwrap()).collect();
    // SAFETY: srcs[0] is a live Vec; the window is full, so the send is refused and nothing keeps the
    // pointer.
    assert_eq!(unsafe { l.send.isend(srcs[0].as_ptr(), 1, NONE) }.unwrap(), None);
    let (mut s_done, mut r_done) = (0, 0);
    drive("16 sends and receives complete", TRANSFER_LIMIT, || {
        if s_done < 16 && l.send.test(sends[s_done]).unwrap().is_some() {
            s_done += 1;
        }
        if r_done < 16
            && let Some(n) = l.recv.test(recvs[r_done]).unwrap()
        {
            assert_eq!(n, srcs[r_done].len());
            r_done += 1;
        }
        (s_done == 16 && r_done == 16).then_some(())
    });
    // All 16 completed but none consumed: the window is still full.
    // SAFETY: dsts[16] is a live Vec; the window is still full, so the receive is refused.
    assert_eq!(unsafe { l.recv.irecv(dsts[16].as_mut_ptr(), 100, NONE) }.unwrap(), None);
    for (i, r) in recvs.iter().enumerate() {
        assert!(dsts[i][..srcs[i].len()] == srcs[i][..], "message {i}");
        l.recv.irecv_consumed(*r).unwrap();
    }
    let src = pattern(100, 5);
    // SAFETY: dsts[16] is a live 30,000-byte Vec (100 posted), read only after r is reported done below.
    let r = unsafe { l.recv.irecv(dsts[16].as_mut_ptr(), 100, NONE) }.unwrap().expect("room again");
    // SAFETY: src is a live 100-byte Vec, and s is tested to completion below.
    let s = unsafe { l.send.isend(src.as_ptr(), 100, NONE) }.unwrap().unwrap();
    assert_eq!(finish(|| l.send.test(s)), 100);
    assert_eq!(finish(|| l.recv.test(r)), 100);
    assert!(dsts[16][..100] == src[..]);
}

#[test]
fn transport_reports_the_fakes_devices() {
    // A3's shape: eth0 without devmem first (TCPX sorts interfaces by name), then the GPU NICs. TCPX
    // reports CUDA pointer support for every interface, eth0 included.
    let net = transport();
    assert_eq!(net.devices(), 3);
    for dev in 0..3 {
        let p = net.properties(dev).unwrap();
        assert_eq!(p.name, format!("eth{dev}"));
        assert!(p.device_unpack && p.supports_host && p.supports_cuda);
        assert!(p.pci_path.is_some());
    }
    // Without a GPU (host mode) channels rotate over every device.
    assert_eq!((0..4).map(|c| net.channel_device(c)).collect::<Vec<_>>(), vec![0, 1, 2, 0]);
    let explicit = PluginNet::open(&Config { net_devices: Some(vec![1]), ..config(1, 1 << 20) }, None).unwrap();
    assert_eq!(explicit.channel_device(3), 1);
}

/// An A3-like host with the fake's topology knob: eth0 without devmem alone under the root of
/// the host bridge, eth1 and eth2 both behind the switch of GPUs 04 and 05, eth3 behind GPU 84's,
/// and nothing behind GPU 8a's.
const TOPOLOGY: &str = "eth0 /sys/devices/pci0000:00/0000:00:04.0; \
    eth1 /sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:06:00.0 0000:04:00.0,0000:05:00.0; \
    eth2 /sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:07:00.0 0000:04:00.0,0000:05:00.0; \
    eth3 /sys/devices/pci0000:81/0000:81:00.0/0000:82:00.0/0000:86:00.0 0000:84:00.0";

#[test]
fn channels_pair_with_the_net_devices_next_to_the_gpu() {
    // The fake reads its topology once per process, in init.
    let out = common::ChildTest::new("child_channels_pair_with_the_net_devices_next_to_the_gpu")
        .ignored()
        .env("FAKE_TCPX_TOPOLOGY", TOPOLOGY)
        .env("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "")
        .env("UCCL_TCPX_FAKE_PLUGIN", common::plugin::fake_plugin())
        .run();
    assert!(out.contains("child checked"), "{out}");
}

#[test]
#[ignore = "run by its parent with FAKE_TCPX_TOPOLOGY set"]
fn child_channels_pair_with_the_net_devices_next_to_the_gpu() {
    let channels = |net: &PluginNet| (0..4).map(|c| net.channel_device(c)).collect::<Vec<_>>();
    let open = |gpu: &str| PluginNet::open(&config(1, 1 << 20), Some(gpu)).unwrap();
    let names: Vec<String> = (0..4).map(|d| transport().properties(d).unwrap().name).collect();
    assert_eq!(names, ["eth0", "eth1", "eth2", "eth3"]);
    assert!(transport().properties(0).unwrap().supports_cuda, "eth0 looks like every TCPX device");

    // A GPU with two close NICs: channels spread over both, and data moves over each.
    let net = open("/sys/devices/pci0000:01/0000:01:00.0/0000:02:00.0/0000:04:00.0");
    assert_eq!(channels(&net), vec![1, 2, 1, 2]);
    for c in 0..2 {
        let mut l = link(&net, net.channel_device(c));
        let src = pattern(300_000, c as u64);
        let mut dst = vec![0u8; src.len()];
        // SAFETY: dst is a live Vec of src.len() bytes, read only after r is reported done below.
        let r = unsafe { l.recv.irecv(dst.as_mut_ptr(), dst.len(), NONE) }.unwrap().unwrap();
        // SAFETY: src is a live Vec, and s is tested to completion below.
        let s = unsafe { l.send.isend(src.as_ptr(), src.len(), NONE) }.unwrap().unwrap();
        assert_eq!(finish(|| l.send.test(s)), src.len());
        assert_eq!(finish(|| l.recv.test(r)), src.len());
        l.recv.irecv_consumed(r).unwrap();
        assert!(dst == src, "channel {c}");
    }
    // The GPU behind eth3 alone.
    assert_eq!(channels(&open("/sys/devices/pci0000:81/0000:81:00.0/0000:82:00.0/0000:84:00.0")), vec![3; 4]);

    // A GPU with no NIC under its root may use none: every listen and connect says so, and eth0,
    // which reports CUDA pointers as every TCPX interface does, is never taken for it.
    let far = "/sys/devices/pci0000:87/0000:87:00.0/0000:88:00.0/0000:8a:00.0";
    let net = open(far);
    let err = net.listen(0).err().expect("no device for this GPU");
    assert_eq!(err.status(), UcclStatus::ErrNotFound, "{err}");
    assert!(err.message().contains(far) && err.message().contains("UCCL_TCPX_NET_DEVICES"), "{err}");
    assert!(err.message().contains("0 eth0 at /sys/devices/pci0000:00/0000:00:04.0"), "{err}");
    let mut handle = [0u8; 128];
    assert_eq!(net.connect(0, &mut handle).err().expect("no device for this GPU").status(), UcclStatus::ErrNotFound);

    // Naming the devices overrides pairing.
    let named = PluginNet::open(&Config { net_devices: Some(vec![3]), ..config(1, 1 << 20) }, Some(far)).unwrap();
    assert_eq!(named.channel_device(1), 3);
    assert!(named.listen(3).is_ok());
    println!("child checked");
}
