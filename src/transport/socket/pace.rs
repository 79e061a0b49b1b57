//! Who takes a send comm's last pieces when its sockets run over links of different rates.
//!
//! A socket takes the next piece whenever it has none, so near the end of the window a socket of
//! a slow link takes one it is still writing long after the others sent everything else, and the
//! request waits for it. A socket therefore declines a piece it would finish later than the
//! others would finish every byte left were it to take none (the earliest-completion-first rule of
//! multipath TCP schedulers, in whole pieces): what it declines stays for the next socket to free
//! up, and it wakes the fastest idle socket. A socket declines only while another socket faster
//! by a clear margin is writing a piece (it comes back for the declined one), so sockets of equal
//! links, whose measured rates differ only by noise, seldom do.
//!
//! A socket's rate is what its peer acknowledged over the time the kernel had its bytes to send
//! (`tcpi_bytes_acked` over `tcpi_busy_time`, sampled as it finishes pieces), so idle spells
//! between transfers do not count, and what it holds in the kernel still (`SIOCOUTQ`) adds to its
//! finish: on a slow link that backlog is what ends a write last. Only comms over data links
//! measure (their sockets' unsent bytes are bounded, `tune::pace_to_link`, so a backlog is never
//! megabytes); elsewhere nobody declines.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::MAX_SOCKETS_PER_COMM;
use crate::sys::tcp;

/// A socket declines only while a busy other socket is at least this much faster.
const MARGIN: f64 = 1.5;

/// Weight of a new sample in a socket's cost, as 1 / (1 << this).
const SMOOTHING_SHIFT: u32 = 2;

/// Busy time a sample spans at least: the kernel counts it in jiffies (1-10 ms).
const SAMPLE_BUSY_US: u64 = 20_000;

/// A socket asks the kernel for its counters at most this often.
const LOOK_EVERY: Duration = Duration::from_millis(2);

/// One socket's measure, on a cache line of its own: each is written by the helper moving the
/// socket's pieces, and read by every socket of the comm that considers a piece.
#[derive(Default)]
#[repr(align(64))]
struct Gauge {
    /// Picoseconds per byte its peer acknowledged while it had bytes out, a moving average; 0
    /// before the first sample. Averaged as time per byte: one burst moves it little.
    cost: AtomicU64,
    /// Payload bytes of the piece it writes now that the kernel has not accepted; 0 with none.
    left: AtomicU64,
    /// Bytes it held in the kernel unacknowledged when it last finished a piece.
    queued: AtomicU64,
    meter: Mutex<Meter>,
}

/// Where a socket's rate sample stands; only the thread moving its piece touches it.
#[derive(Default)]
struct Meter {
    /// Bytes acknowledged and busy microseconds where the sample being gathered began.
    mark: Option<(u64, u64)>,
    /// When the kernel was last asked.
    looked: Option<Instant>,
}

/// The measures of a send comm's sockets, socket `k` at index `k`.
pub(super) struct Pace {
    gauges: Box<[Gauge]>,
}

/// What the decision reads of one other socket.
#[derive(Clone, Copy, Debug)]
pub(super) struct Other {
    /// Picoseconds per byte, 0 when unmeasured.
    pub cost: u64,
    /// Bytes of its piece it has not written (0: not writing one).
    pub left: u64,
    /// Bytes it held in the kernel when last measured.
    pub queued: u64,
}

impl Gauge {
    fn sample(&self, cost: u64) {
        let old = self.cost.load(Ordering::Relaxed);
        let new = if old == 0 { cost } else { old - (old >> SMOOTHING_SHIFT) + (cost >> SMOOTHING_SHIFT) };
        self.cost.store(new.max(1), Ordering::Relaxed);
    }
}

impl Pace {
    pub fn new(sockets: usize) -> Pace {
        Pace { gauges: (0..sockets).map(|_| Gauge::default()).collect() }
    }

    /// Socket `k` has `left` payload bytes of its piece to write (0: it wrote them all).
    pub fn left(&self, k: usize, left: usize) {
        self.gauges[k].left.store(left as u64, Ordering::Relaxed);
    }

    /// Socket `k` (its descriptor `fd`) wrote all of its piece: its backlog, and a sample of its
    /// rate once its kernel was busy long enough since the last. The kernel is asked at most every
    /// [`LOOK_EVERY`]: on a fast link pieces finish every few microseconds.
    pub fn wrote(&self, k: usize, fd: RawFd) {
        let g = &self.gauges[k];
        g.left.store(0, Ordering::Relaxed);
        let mut meter = g.meter.lock();
        let now = Instant::now();
        if meter.looked.is_some_and(|t| now.duration_since(t) < LOOK_EVERY) {
            return;
        }
        meter.looked = Some(now);
        let Some((info, reported)) = tcp::info(fd) else { return };
        // Kernels before 4.10 report no busy time: nothing is measured there.
        if reported < std::mem::offset_of!(libc::tcp_info, tcpi_busy_time) + 8 {
            return;
        }
        let queued = u64::from(info.tcpi_notsent_bytes) + u64::from(info.tcpi_unacked) * u64::from(info.tcpi_snd_mss);
        g.queued.store(queued, Ordering::Relaxed);
        let seen = (info.tcpi_bytes_acked, info.tcpi_busy_time);
        match meter.mark {
            Some((acked, busy)) if seen.1 >= busy + SAMPLE_BUSY_US => {
                if seen.0 > acked {
                    g.sample((seen.1 - busy) * 1_000_000 / (seen.0 - acked));
                }
                meter.mark = Some(seen);
            }
            Some(_) => {}
            None => meter.mark = Some(seen),
        }
    }

    /// The fastest measured socket other than `k`, faster than it, for which `idle(j)` holds.
    pub fn faster_idle(&self, k: usize, idle: impl Fn(usize) -> bool) -> Option<usize> {
        let cost = |j: usize| self.gauges[j].cost.load(Ordering::Relaxed);
        let mine = cost(k);
        (0..self.gauges.len()).filter(|&j| j != k && (1..mine).contains(&cost(j)) && idle(j)).min_by_key(|&j| cost(j))
    }

    /// What socket `k` (its descriptor `fd`) weighs before it takes a piece, read before the
    /// window's lock is taken (its backlog is a system call); `None` when it would take any piece:
    /// unmeasured, or no busy socket among those `open(j)` names is clearly faster.
    pub fn weigh(&self, k: usize, fd: RawFd, open: impl Fn(usize) -> bool) -> Option<Weighed> {
        let cost = self.gauges[k].cost.load(Ordering::Relaxed);
        if cost == 0 {
            return None;
        }
        let mut w =
            Weighed { cost, backlog: 0, others: [Other { cost: 0, left: 0, queued: 0 }; MAX_SOCKETS_PER_COMM], n: 0 };
        let gauges = self.gauges.iter().enumerate().filter(|&(j, _)| j != k && open(j));
        for (_, g) in gauges.take(MAX_SOCKETS_PER_COMM) {
            w.others[w.n] = Other {
                cost: g.cost.load(Ordering::Relaxed),
                left: g.left.load(Ordering::Relaxed),
                queued: g.queued.load(Ordering::Relaxed),
            };
            w.n += 1;
        }
        if !slower_than_a_busy_other(cost, &w.others[..w.n]) {
            return None;
        }
        w.backlog = tcp::unacked_bytes(fd);
        Some(w)
    }
}

/// A socket's view of itself and the others before a piece (`Pace::weigh`), on the stack: it is
/// taken for every piece a slow socket considers.
pub(super) struct Weighed {
    cost: u64,
    /// Bytes it holds in the kernel unacknowledged.
    backlog: u64,
    others: [Other; MAX_SOCKETS_PER_COMM],
    n: usize,
}

impl Weighed {
    /// Whether the socket leaves a piece of `len` bytes to the others, `uncut` bytes being left
    /// that no socket took (this piece's included).
    pub fn declines(&self, len: u64, uncut: u64) -> bool {
        later_than_the_others(self.cost, len + self.backlog, len, uncut, &self.others[..self.n])
    }
}

/// Whether a busy other socket is at least `MARGIN` times faster than one of `cost`: only then
/// may it decline, the busy one coming back for the piece.
pub(super) fn slower_than_a_busy_other(cost: u64, others: &[Other]) -> bool {
    others.iter().any(|o| o.cost > 0 && o.left > 0 && o.cost as f64 * MARGIN <= cost as f64)
}

/// Whether a socket of `cost` that must still move `mine` bytes to finish a piece of `len` (the
/// piece and its backlog in the kernel) finishes after `others` would finish `uncut` bytes and
/// their own pieces, were it to take none. The others finish no sooner than the fluid bound (all
/// their bytes at their summed rate) and than the first of them free to take the piece would
/// finish it. Unmeasured others count for nothing.
pub(super) fn later_than_the_others(cost: u64, mine: u64, len: u64, uncut: u64, others: &[Other]) -> bool {
    let measured = others.iter().filter(|o| o.cost > 0);
    let (mut rate, mut bytes, mut first) = (0f64, uncut as f64, f64::INFINITY);
    for o in measured {
        rate += 1.0 / o.cost as f64;
        bytes += (o.left + o.queued) as f64;
        first = first.min((o.left + o.queued + len) as f64 * o.cost as f64);
    }
    if rate == 0.0 {
        return false;
    }
    let theirs = (bytes / rate).max(first);
    mine as f64 * cost as f64 > theirs
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIECE: u64 = 256 << 10;

    fn busy(cost: u64) -> Other {
        Other { cost, left: PIECE / 2, queued: 0 }
    }

    /// Equal sockets never decline, however few bytes are left: the first of the others to
    /// free up would finish the piece later than this one does now.
    #[test]
    fn equal_sockets_take_every_piece() {
        let others = vec![busy(100); 15];
        assert!(!slower_than_a_busy_other(100, &others));
        for uncut in [PIECE, 2 * PIECE, 64 * PIECE] {
            assert!(!later_than_the_others(100, PIECE, PIECE, uncut, &others), "{uncut} left");
        }
        assert!(!slower_than_a_busy_other(140, &others), "within the margin");
    }

    /// A socket four times slower than the others takes pieces while much is left and declines
    /// near the end, where the others finish everything before its one piece.
    #[test]
    fn a_slow_socket_declines_the_last_pieces() {
        let others: Vec<Other> = std::iter::repeat_n(busy(100), 12).chain(std::iter::repeat_n(busy(400), 3)).collect();
        assert!(slower_than_a_busy_other(400, &others));
        // Its piece takes 4 x PIECE x 100; the others move 12.75 bytes per 100 ps, so they finish
        // about 51 pieces' worth in that time, their own half pieces included.
        assert!(later_than_the_others(400, PIECE, PIECE, 8 * PIECE, &others));
        assert!(later_than_the_others(400, PIECE, PIECE, 40 * PIECE, &others));
        assert!(!later_than_the_others(400, PIECE, PIECE, 60 * PIECE, &others));
        // Its backlog in the kernel counts as bytes it must still move; so do the others'.
        assert!(later_than_the_others(400, 2 * PIECE, PIECE, 60 * PIECE, &others));
        let backlogged: Vec<Other> = others.iter().map(|o| Other { queued: 2 * PIECE, ..*o }).collect();
        assert!(!later_than_the_others(400, PIECE, PIECE, 40 * PIECE, &backlogged));
    }

    /// Others without a measure count for nothing: with none measured, nobody declines; and a
    /// socket with no measure of its own takes the piece.
    #[test]
    fn unmeasured_sockets_change_nothing() {
        let unmeasured = vec![Other { cost: 0, left: PIECE, queued: 0 }; 4];
        assert!(!slower_than_a_busy_other(400, &unmeasured));
        assert!(!later_than_the_others(400, PIECE, PIECE, PIECE, &unmeasured));
        let pace = Pace::new(2);
        pace.gauges[1].sample(100);
        pace.left(1, PIECE as usize);
        assert!(pace.weigh(0, -1, |_| true).is_none(), "socket 0 has no measure");
    }

    /// Idle faster sockets do not make a slow one decline: nobody would come back for the piece.
    #[test]
    fn a_slow_socket_takes_the_piece_when_no_faster_one_is_busy() {
        let idle = vec![Other { cost: 100, left: 0, queued: 0 }; 4];
        assert!(!slower_than_a_busy_other(400, &idle));
        let pace = Pace::new(3);
        for (k, cost) in [(0, 400), (1, 100), (2, 100)] {
            pace.gauges[k].sample(cost);
        }
        assert!(pace.weigh(0, -1, |_| true).is_none(), "both others idle");
        pace.left(1, 1000);
        let weighed = pace.weigh(0, -1, |_| true).expect("socket 1 is busy and faster");
        assert!(weighed.declines(PIECE, PIECE), "socket 1 is busy and comes back");
        assert!(!weighed.declines(PIECE, 64 * PIECE), "much is left");
        assert!(pace.weigh(0, -1, |j| j != 1).is_none(), "the busy one is closed");
    }

    /// A socket that declines wakes the fastest idle one faster than itself, never a slower or
    /// unmeasured one, nor a busy one.
    #[test]
    fn the_fastest_idle_socket_is_the_one_to_wake() {
        let pace = Pace::new(5);
        for (k, cost) in [(0, 400), (1, 300), (2, 100), (3, 500)] {
            pace.gauges[k].sample(cost);
        }
        assert_eq!(pace.faster_idle(0, |_| true), Some(2));
        assert_eq!(pace.faster_idle(0, |j| j != 2), Some(1));
        assert_eq!(pace.faster_idle(0, |j| j == 3 || j == 4), None, "slower or unmeasured");
        assert_eq!(pace.faster_idle(2, |_| true), None, "nothing is faster");
    }

    /// The cost is a moving average of time per byte: a burst moves it by a quarter at most.
    #[test]
    fn the_cost_is_a_moving_average_of_time_per_byte() {
        let g = Gauge::default();
        g.sample(1000);
        assert_eq!(g.cost.load(Ordering::Relaxed), 1000);
        g.sample(1);
        assert_eq!(g.cost.load(Ordering::Relaxed), 750);
    }

    /// Rates come from the kernel's counters of a real connection: nothing before two samples a
    /// busy spell apart, and a finite cost once bytes were acknowledged over it.
    #[test]
    fn a_connection_that_moved_bytes_gets_a_cost() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0usize;
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
                // A slow reader keeps the sender's kernel busy.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            total
        });
        let pace = Pace::new(1);
        pace.wrote(0, tx.as_raw_fd());
        let Some((_, reported)) = tcp::info(tx.as_raw_fd()) else { panic!("TCP_INFO on a TCP socket") };
        let chunk = vec![7u8; 256 << 10];
        let start = std::time::Instant::now();
        while pace.gauges[0].cost.load(Ordering::Relaxed) == 0 {
            assert!(start.elapsed() < testkit::PATIENCE, "no sample within {:?}", testkit::PATIENCE);
            if reported < std::mem::offset_of!(libc::tcp_info, tcpi_busy_time) + 8 {
                return; // a kernel without busy time measures nothing, as `wrote` says
            }
            tx.write_all(&chunk).unwrap();
            pace.wrote(0, tx.as_raw_fd());
        }
        drop(tx);
        assert!(reader.join().unwrap() > 0);
        let cost = pace.gauges[0].cost.load(Ordering::Relaxed);
        assert!((1..1_000_000_000).contains(&cost), "{cost} ps per byte");
    }
}
