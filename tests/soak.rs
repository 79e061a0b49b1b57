//! Soak: many transfers of random kinds and sizes over several connections at once, every payload
//! checked by content, process RSS compared between the end of a warm-up and the end of the run,
//! latency percentiles printed.
//!
//! - `soak_small` (runs in CI): 5,000 transfers up to 512 KiB, a second or two in debug.
//! - `soak_full` (ignored): >= 100,000 transfers up to 4 MiB; RSS growth after warm-up must stay
//!   under 5 %. Run it with
//!   `cargo test --release --test soak -- --ignored --nocapture`
//!   (`UCCL_TCPX_SOAK_TRANSFERS=N` changes the count). Figures are recorded in docs/TESTING.md.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uccl_tcpx::{Config, Connection, Engine, FifoItem, OneSided};

mod common;
use common::{Rng, fill};

/// Both tests use the process-wide notification queue; they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

struct Params {
    connections: usize,
    transfers: usize,
    /// Largest payload (and the size of each buffer slot).
    max_len: usize,
    /// Transfers posted together before waiting for them.
    max_batch: usize,
    warmup: usize,
    /// Names the run's random streams (one per worker).
    name: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Write,
    WriteVector,
    Read,
    ReadVector,
    SendAtoB,
    SendBtoA,
    SendVector,
    Notify,
}

const KINDS: [Kind; 8] = [
    Kind::Write,
    Kind::WriteVector,
    Kind::Read,
    Kind::ReadVector,
    Kind::SendAtoB,
    Kind::SendBtoA,
    Kind::SendVector,
    Kind::Notify,
];

/// Soak sizes on top of the shared generator.
trait SizeRng {
    fn size(&mut self, max: usize, chunk: usize) -> usize;
}

impl SizeRng for Rng {
    /// Log-uniform in [1, max], with the chunking edge cases mixed in.
    fn size(&mut self, max: usize, chunk: usize) -> usize {
        match self.below(16) {
            0 => 1,
            1 => chunk.min(max),
            2 => (chunk + 1).min(max),
            3 => max,
            _ => {
                let bits = usize::BITS - max.leading_zeros();
                let top = 1usize << self.below(bits as usize + 1);
                (1 + self.below(top)).min(max)
            }
        }
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Routes the process-wide notification queue into per-name mailboxes, so workers draining it
/// concurrently each find their own messages.
static MAILBOX: Mutex<Option<Mailboxes>> = Mutex::new(None);

/// Notification messages by name, oldest first.
type Mailboxes = HashMap<Vec<u8>, VecDeque<Vec<u8>>>;

fn take_notification(name: &[u8]) -> Option<Vec<u8>> {
    let mut guard = MAILBOX.lock().unwrap();
    let boxes = guard.get_or_insert_with(HashMap::new);
    for n in uccl_tcpx::drain_notifications(1024) {
        boxes.entry(n.name).or_default().push_back(n.msg);
    }
    boxes.get_mut(name).and_then(|q| q.pop_front())
}

/// One connection's buffers: `slots` slots of `max_len` bytes in each of four regions.
struct Worker {
    id: usize,
    ab: Arc<Connection>,
    ba: Arc<Connection>,
    slot: usize,
    a_src: Vec<u8>,
    a_dst: Vec<u8>,
    b_src: Vec<u8>,
    b_dst: Vec<u8>,
    mr: [u64; 4],
    /// B's capabilities for its destination (written) and source (read) regions.
    b_dst_item: FifoItem,
    b_src_item: FifoItem,
}

#[derive(Clone, Copy)]
enum Side {
    A,
    B,
}

/// A posted transfer: the ids to wait for, and (destination, source) byte ranges that must match.
struct Posted {
    kind: Kind,
    start: Instant,
    waits: Vec<(Side, u64)>,
    checks: Vec<(*const u8, *const u8, usize)>,
    notify: Option<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
}

/// Per-worker results. The latency arrays are allocated and written in full before the first
/// transfer, so recording into them does not show up as RSS growth during the run.
struct Stats {
    latencies: Vec<u32>,
    kinds: Vec<Kind>,
    bytes: u64,
    count: usize,
}

impl Worker {
    fn new(id: usize, a: &Engine, b: &Engine, ab: Arc<Connection>, ba: Arc<Connection>, p: &Params) -> Worker {
        let size = p.max_len * p.max_batch;
        let (mut a_src, mut a_dst, mut b_src, mut b_dst) =
            (vec![0u8; size], vec![0u8; size], vec![0u8; size], vec![0u8; size]);
        let mr = [
            a.register(a_src.as_mut_ptr() as usize, size).unwrap(),
            a.register(a_dst.as_mut_ptr() as usize, size).unwrap(),
            b.register(b_src.as_mut_ptr() as usize, size).unwrap(),
            b.register(b_dst.as_mut_ptr() as usize, size).unwrap(),
        ];
        let b_dst_item = b.prepare_fifo(mr[3], b_dst.as_mut_ptr() as usize, size).unwrap();
        let b_src_item = b.prepare_fifo(mr[2], b_src.as_mut_ptr() as usize, size).unwrap();
        Worker { id, ab, ba, slot: p.max_len, a_src, a_dst, b_src, b_dst, mr, b_dst_item, b_src_item }
    }

    fn conn(&self, side: Side) -> &Connection {
        match side {
            Side::A => &self.ab,
            Side::B => &self.ba,
        }
    }

    /// Splits `len` into 1 to 3 non-empty pieces.
    fn pieces(rng: &mut Rng, len: usize) -> Vec<(usize, usize)> {
        let n = if len < 3 { 1 } else { 1 + rng.below(3) };
        let mut cuts: Vec<usize> = (1..n).map(|_| 1 + rng.below(len - 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([len]) {
            out.push((at, c - at));
            at = c;
        }
        out
    }

    fn post(&mut self, rng: &mut Rng, kind: Kind, slot: usize, len: usize, seed: u64) -> Posted {
        let off = slot * self.slot;
        let start = Instant::now();
        let item_at =
            |item: FifoItem, o: usize, l: usize| FifoItem { addr: item.addr + o as u64, size: l as u32, ..item };
        let mut waits = Vec::new();
        let mut checks = Vec::new();
        let mut notify = None;
        match kind {
            Kind::Write | Kind::WriteVector => {
                fill(&mut self.a_src[off..off + len], seed);
                let parts = if kind == Kind::Write { vec![(0, len)] } else { Self::pieces(rng, len) };
                let ops: Vec<OneSided> = parts
                    .iter()
                    .map(|&(o, l)| OneSided {
                        mr: self.mr[0],
                        addr: self.a_src.as_ptr() as usize + off + o,
                        len: l,
                        remote: item_at(self.b_dst_item, off + o, l),
                    })
                    .collect();
                waits.push((Side::A, self.ab.write(&ops).unwrap()));
                checks.push((self.b_dst[off..].as_ptr(), self.a_src[off..].as_ptr(), len));
            }
            Kind::Read | Kind::ReadVector => {
                fill(&mut self.b_src[off..off + len], seed);
                let parts = if kind == Kind::Read { vec![(0, len)] } else { Self::pieces(rng, len) };
                let ops: Vec<OneSided> = parts
                    .iter()
                    .map(|&(o, l)| OneSided {
                        mr: self.mr[1],
                        addr: self.a_dst.as_mut_ptr() as usize + off + o,
                        len: l,
                        remote: item_at(self.b_src_item, off + o, l),
                    })
                    .collect();
                waits.push((Side::A, self.ab.read(&ops).unwrap()));
                checks.push((self.a_dst[off..].as_ptr(), self.b_src[off..].as_ptr(), len));
            }
            Kind::SendAtoB | Kind::SendBtoA | Kind::SendVector => {
                let (tx, rx) = if kind == Kind::SendBtoA { (Side::B, Side::A) } else { (Side::A, Side::B) };
                let (src, src_mr, dst_ptr, dst_mr) = match tx {
                    Side::A => (&mut self.a_src, self.mr[0], self.b_dst.as_mut_ptr() as usize, self.mr[3]),
                    Side::B => (&mut self.b_src, self.mr[2], self.a_dst.as_mut_ptr() as usize, self.mr[1]),
                };
                fill(&mut src[off..off + len], seed);
                let src_ptr = src.as_ptr() as usize;
                let parts = if kind == Kind::SendVector { Self::pieces(rng, len) } else { vec![(0, len)] };
                let recv_first = rng.below(2) == 0;
                let post_recvs = |w: &mut Vec<(Side, u64)>| {
                    for &(o, l) in &parts {
                        // Each receive gets the whole rest of the slot: sizes need not match exactly.
                        let id = self.conn(rx).recv(dst_mr, dst_ptr + off + o, self.slot - o).unwrap();
                        assert!(l <= self.slot - o);
                        w.push((rx, id));
                    }
                };
                if recv_first {
                    post_recvs(&mut waits);
                }
                let msgs: Vec<(u64, usize, usize)> =
                    parts.iter().map(|&(o, l)| (src_mr, src_ptr + off + o, l)).collect();
                waits.push((tx, self.conn(tx).send(&msgs).unwrap()));
                if !recv_first {
                    post_recvs(&mut waits);
                }
                checks.push(((dst_ptr + off) as *const u8, (src_ptr + off) as *const u8, len));
            }
            Kind::Notify => {
                let name = format!("soak-{}", self.id).into_bytes();
                let mut msg = vec![0u8; 1 + rng.below(256)];
                fill(&mut msg, seed);
                self.ab.notify(&name, &msg).unwrap();
                notify = Some((name, msg));
            }
        }
        Posted { kind, start, waits, checks, notify, bytes: len }
    }

    /// Waits for a batch; records latencies. Panics on any failure or mismatch.
    fn finish(&mut self, batch: Vec<Posted>, stats: &mut Stats) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut open: Vec<(Posted, Vec<bool>, Option<Instant>)> = batch
            .into_iter()
            .map(|p| {
                let n = p.waits.len();
                (p, vec![false; n], None)
            })
            .collect();
        loop {
            // Notifications arrive in posting order: match each arrival to the oldest one pending.
            let name = format!("soak-{}", self.id).into_bytes();
            while open.iter().any(|(p, _, _)| p.notify.is_some()) {
                let Some(got) = take_notification(&name) else { break };
                let (p, _, _) = open.iter_mut().find(|(p, _, _)| p.notify.is_some()).expect("checked above");
                let (_, msg) = p.notify.take().expect("checked above");
                assert_eq!(got, msg, "worker {}: notification out of order or corrupted", self.id);
            }
            let mut all = true;
            for (p, done, finished) in open.iter_mut() {
                if finished.is_some() {
                    continue;
                }
                for (i, &(side, id)) in p.waits.iter().enumerate() {
                    if !done[i] {
                        match self.conn(side).poll(id) {
                            Ok(Some(_)) => done[i] = true,
                            Ok(None) => {}
                            Err(e) => panic!("worker {}: {:?} failed: {e}", self.id, p.kind),
                        }
                    }
                }
                if p.notify.is_none() && done.iter().all(|d| *d) {
                    *finished = Some(Instant::now());
                } else {
                    all = false;
                }
            }
            if all {
                break;
            }
            assert!(Instant::now() < deadline, "worker {}: a batch did not finish within 60 s", self.id);
            std::thread::yield_now();
        }
        for (p, _, finished) in open {
            for &(dst, src, len) in &p.checks {
                // SAFETY: both ranges lie inside this worker's live buffers, and the transfer that
                // wrote `dst` has completed.
                let (d, s) = unsafe { (std::slice::from_raw_parts(dst, len), std::slice::from_raw_parts(src, len)) };
                assert!(d == s, "worker {}: {:?} of {len} bytes delivered wrong content", self.id, p.kind);
            }
            let us = finished.unwrap().duration_since(p.start).as_micros().min(u32::MAX as u128) as u32;
            stats.latencies[stats.count] = us;
            stats.kinds[stats.count] = p.kind;
            stats.bytes += p.bytes as u64;
            stats.count += 1;
        }
    }
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

struct Report {
    transfers: usize,
    rss_warm_kib: u64,
    rss_end_kib: u64,
}

fn run(p: &Params) -> Report {
    let config = Config { num_channels: Some(3), chunk_size: 512 << 10, ..common::loopback() };
    let chunk = config.chunk_size as usize;
    let a = Arc::new(Engine::new(config.clone()).unwrap());
    let b = Arc::new(Engine::new(config).unwrap());
    let mut workers = Vec::new();
    for id in 0..p.connections {
        let ab = a.connect("127.0.0.1", "0", b.address().port()).unwrap();
        let ba = common::accept(&b).unwrap();
        workers.push(Worker::new(id, &a, &b, ab, ba, p));
    }
    let completed = Arc::new(AtomicU64::new(0));
    let per_worker = p.transfers.div_ceil(p.connections);
    let start = Instant::now();
    let handles: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            let completed = completed.clone();
            let (max_len, max_batch) = (p.max_len, p.max_batch);
            let stream = format!("{} worker {}", p.name, w.id);
            std::thread::spawn(move || {
                let mut rng = Rng::new(&stream);
                let mut stats = Stats {
                    latencies: vec![u32::MAX; per_worker],
                    kinds: vec![Kind::Notify; per_worker],
                    bytes: 0,
                    count: 0,
                };
                let mut n = 0usize;
                while n < per_worker {
                    let batch = (1 + rng.below(max_batch)).min(per_worker - n);
                    let posted: Vec<Posted> = (0..batch)
                        .map(|slot| {
                            let kind = KINDS[rng.below(KINDS.len())];
                            let len = rng.size(max_len, chunk);
                            let seed = rng.u64();
                            w.post(&mut rng, kind, slot, len, seed)
                        })
                        .collect();
                    w.finish(posted, &mut stats);
                    n += batch;
                    completed.fetch_add(batch as u64, Ordering::Relaxed);
                }
                (w, stats)
            })
        })
        .collect();
    // Sample RSS once the warm-up count is reached (all buffers and pools in use by then).
    let mut rss_warm = None;
    while rss_warm.is_none() && !handles.iter().all(|h| h.is_finished()) {
        if completed.load(Ordering::Relaxed) >= p.warmup as u64 {
            rss_warm = Some(rss_kib());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let results: Vec<(Worker, Stats)> = handles.into_iter().map(|h| h.join().expect("a soak worker failed")).collect();
    let elapsed = start.elapsed();
    let rss_end = rss_kib();
    let rss_warm = rss_warm.unwrap_or(rss_end);
    // Merge and report.
    let mut by_kind: HashMap<Kind, Vec<u32>> = HashMap::new();
    let (mut bytes, mut count) = (0u64, 0usize);
    for (_, s) in &results {
        for (k, us) in s.kinds.iter().zip(&s.latencies).take(s.count) {
            by_kind.entry(*k).or_default().push(*us);
        }
        bytes += s.bytes;
        count += s.count;
    }
    let mut all: Vec<u32> = by_kind.values().flatten().copied().collect();
    all.sort_unstable();
    eprintln!(
        "soak: {count} transfers over {} connections in {:.1} s ({:.0} transfers/s, {:.2} GB payload, {:.2} GB/s)",
        p.connections,
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / elapsed.as_secs_f64()
    );
    eprintln!(
        "latency (post to completion, batches of 1-{}): p50 {} us, p99 {} us, max {} us",
        p.max_batch,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0)
    );
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort();
    for (k, mut v) in kinds {
        v.sort_unstable();
        eprintln!(
            "  {:<12} {:>7} transfers  p50 {:>7} us  p99 {:>7} us  max {:>7} us",
            format!("{k:?}"),
            v.len(),
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(0)
        );
    }
    eprintln!(
        "RSS after warm-up ({} transfers): {} KiB, at the end: {} KiB ({:+.2} %)",
        p.warmup,
        rss_warm,
        rss_end,
        (rss_end as f64 - rss_warm as f64) * 100.0 / rss_warm as f64
    );
    assert_eq!(count, per_worker * p.connections);
    // Every worker's registrations are still valid, and the engines shut down cleanly.
    for (w, _) in &results {
        a.deregister(w.mr[0]).unwrap();
        a.deregister(w.mr[1]).unwrap();
        b.deregister(w.mr[2]).unwrap();
        b.deregister(w.mr[3]).unwrap();
    }
    assert!(take_notification(b"soak-0").is_none(), "unexpected extra notification");
    drop(results);
    a.shutdown();
    b.shutdown();
    Report { transfers: count, rss_warm_kib: rss_warm, rss_end_kib: rss_end }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn soak_small() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Params {
        connections: 3,
        transfers: 5_000,
        max_len: 512 << 10,
        max_batch: 4,
        warmup: 1_000,
        name: "soak_small",
    };
    let r = run(&p);
    assert!(r.transfers >= 5_000);
    // Loose in CI (a short run is mostly warm-up); the full soak holds it to 5 %.
    assert!(
        r.rss_end_kib < r.rss_warm_kib + r.rss_warm_kib / 4,
        "RSS grew from {} to {} KiB",
        r.rss_warm_kib,
        r.rss_end_kib
    );
}

#[test]
#[ignore = "long: run with cargo test --release --test soak -- --ignored --nocapture"]
fn soak_full() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let transfers = env_usize("UCCL_TCPX_SOAK_TRANSFERS").unwrap_or(120_000);
    let p =
        Params { connections: 4, transfers, max_len: 4 << 20, max_batch: 4, warmup: transfers / 10, name: "soak_full" };
    let r = run(&p);
    assert!(r.transfers >= 100_000 || env_usize("UCCL_TCPX_SOAK_TRANSFERS").is_some());
    let limit = r.rss_warm_kib + r.rss_warm_kib / 20;
    assert!(r.rss_end_kib < limit, "RSS grew more than 5 %: {} -> {} KiB", r.rss_warm_kib, r.rss_end_kib);
    // Most of the RSS is the fixed transfer buffers, so 5 % of it is lenient; bound the growth in
    // absolute terms too (1 MiB over ~100,000 transfers is about 10 bytes per transfer).
    let growth = r.rss_end_kib.saturating_sub(r.rss_warm_kib);
    assert!(growth < 1 << 10, "RSS grew by {growth} KiB after warm-up");
}
