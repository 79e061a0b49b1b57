//! A connection's counters: what its caller's transfers moved and how they ended. Plain numbers
//! read as one snapshot, as quinn-proto's `ConnectionStats`; kept in atomics that a transfer
//! touches once, when it ends, so counting costs nothing on the data path.
//!
//! A transfer counts for the connection it was posted on and the way its bytes went: writes and
//! sends out, reads and receives in. The peer's one-sided transfers into or out of our memory are
//! the peer's and count there.

use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use crate::error::{Error, UcclStatus};

/// Statuses are negative and at least -15 (`UcclStatus`): slot `n` counts status `-n`.
pub const STATUS_SLOTS: usize = 16;

/// Which way a transfer's bytes go, seen from the connection's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Writes and sends.
    Out,
    /// Reads and receives.
    In,
}

/// Transfers that finished well one way, and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub transfers: u64,
    pub bytes: u64,
}

/// One reading of a connection's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub out: Moved,
    pub inbound: Moved,
    /// Transfers posted and not ended yet.
    pub in_flight: u64,
    /// Transfers that ended in an error once they had an id (a call refused by its argument checks
    /// returns its error before that and is counted nowhere).
    pub failed: u64,
    /// Failed transfers by status: slot `n` for status `-n`.
    pub errors: [u64; STATUS_SLOTS],
    /// Stretches in which a transport declined posts for now and the engine polled to retry them
    /// (one per stretch, however many tries it took).
    pub retries: u64,
    /// The status of the latest failure, 0 while none failed.
    pub last_error: i32,
    /// The peer's mid-size messages that arrived before a receive was posted for them: each waited
    /// in the connection's landing memory and was copied into its receive (an extra copy a
    /// receive posted ahead saves).
    pub landed: u64,
    /// Times the connection closed its channels, idle (`UCCL_TCPX_IDLE_CLOSE_MS`), and opened new
    /// ones for a transfer that then waited for them.
    pub idle_closes: u64,
    pub reopens: u64,
}

/// What a connection's data sockets on one link carried, both ways, summed over its channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTotals {
    /// The link's local address (the engine's own where the transport has no data links).
    pub link: std::net::IpAddr,
    pub out: LinkWay,
    pub inbound: LinkWay,
}

/// One way of a link: its sockets, the payload bytes and pieces they moved whole, the sockets that
/// failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkWay {
    pub sockets: u32,
    pub bytes: u64,
    pub pieces: u64,
    pub errors: u64,
}

/// Sums the channels' per-comm link counts (`sent` from send comms, `received` from receive
/// comms) by link, in the order links first appear.
pub fn link_totals<'a>(
    sent: impl IntoIterator<Item = &'a crate::transport::LinkStats>,
    received: impl IntoIterator<Item = &'a crate::transport::LinkStats>,
) -> Vec<LinkTotals> {
    let mut totals: Vec<LinkTotals> = Vec::new();
    let mut add = |s: &crate::transport::LinkStats, out: bool| {
        let at = match totals.iter().position(|t| t.link == s.link) {
            Some(at) => at,
            None => {
                totals.push(LinkTotals { link: s.link, out: LinkWay::default(), inbound: LinkWay::default() });
                totals.len() - 1
            }
        };
        let way = if out { &mut totals[at].out } else { &mut totals[at].inbound };
        way.sockets += s.sockets;
        way.bytes += s.bytes;
        way.pieces += s.pieces;
        way.errors += s.errors;
    };
    sent.into_iter().for_each(|s| add(s, true));
    received.into_iter().for_each(|s| add(s, false));
    totals
}

#[derive(Default)]
pub struct StatsCell {
    out_transfers: AtomicU64,
    out_bytes: AtomicU64,
    in_transfers: AtomicU64,
    in_bytes: AtomicU64,
    started: AtomicU64,
    ended: AtomicU64,
    failed: AtomicU64,
    errors: [AtomicU64; STATUS_SLOTS],
    retries: AtomicU64,
    last_error: AtomicI32,
}

impl StatsCell {
    pub fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A transfer ended: `Ok(bytes)` or its first error.
    pub fn ended(&self, way: Way, outcome: Result<u64, &Error>) {
        match outcome {
            Ok(bytes) => {
                let (transfers, total) = match way {
                    Way::Out => (&self.out_transfers, &self.out_bytes),
                    Way::In => (&self.in_transfers, &self.in_bytes),
                };
                transfers.fetch_add(1, Ordering::Relaxed);
                total.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => self.failed_with(e.status()),
        }
        // Last, so that a reader never sees a transfer gone from `in_flight` and not yet counted.
        self.ended.fetch_add(1, Ordering::Release);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn failed_with(&self, status: UcclStatus) {
        let code = status as i32;
        self.failed.fetch_add(1, Ordering::Relaxed);
        let slot = usize::try_from(-i64::from(code)).ok().filter(|&s| s < STATUS_SLOTS).unwrap_or(0);
        self.errors[slot].fetch_add(1, Ordering::Relaxed);
        self.last_error.store(code, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ConnStats {
        let ended = self.ended.load(Ordering::Acquire);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConnStats {
            out: Moved { transfers: load(&self.out_transfers), bytes: load(&self.out_bytes) },
            inbound: Moved { transfers: load(&self.in_transfers), bytes: load(&self.in_bytes) },
            in_flight: load(&self.started).saturating_sub(ended),
            failed: load(&self.failed),
            errors: std::array::from_fn(|i| load(&self.errors[i])),
            retries: load(&self.retries),
            last_error: self.last_error.load(Ordering::Relaxed),
            // The connection's state counts these (`Connection::stats`).
            landed: 0,
            idle_closes: 0,
            reopens: 0,
        }
    }
}

impl fmt::Display for ConnStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out {} transfers / {} bytes, in {} / {} bytes, {} in flight, {} failed",
            self.out.transfers, self.out.bytes, self.inbound.transfers, self.inbound.bytes, self.in_flight, self.failed
        )?;
        for (slot, n) in self.errors.iter().enumerate().filter(|(_, n)| **n > 0) {
            let status = UcclStatus::from_code(-(slot as i32)).map_or("unknown", UcclStatus::name);
            write!(f, " ({n} {status})")?;
        }
        if self.last_error != 0 {
            write!(f, ", last error {}", self.last_error)?;
        }
        write!(f, ", {} retries, {} landed before their receive", self.retries, self.landed)?;
        if self.idle_closes > 0 {
            write!(f, ", channels closed idle {} times, opened again {}", self.idle_closes, self.reopens)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_count_each_way_once_ended_and_failures_by_status() {
        let cell = StatsCell::default();
        for _ in 0..4 {
            cell.started();
        }
        assert_eq!(cell.snapshot().in_flight, 4);
        cell.ended(Way::Out, Ok(100));
        cell.ended(Way::In, Ok(7));
        cell.ended(Way::Out, Err(&Error::new(UcclStatus::ErrTimeout, "stalled")));
        let s = cell.snapshot();
        assert_eq!((s.out, s.inbound), (Moved { transfers: 1, bytes: 100 }, Moved { transfers: 1, bytes: 7 }));
        assert_eq!((s.in_flight, s.failed, s.errors[14], s.last_error), (1, 1, 1, -14));
        cell.ended(Way::In, Err(&Error::not_allowed("outside the region")));
        cell.retried();
        let s = cell.snapshot();
        assert_eq!((s.in_flight, s.failed, s.errors[6], s.errors[14], s.last_error, s.retries), (0, 2, 1, 1, -6, 1));
        assert_eq!(s.inbound.transfers, 1, "a failed read moves nothing into the counts of bytes");
        let line = s.to_string();
        assert!(line.contains("2 failed") && line.contains("UCCL_STATUS_ERR_TIMEOUT"), "{line}");
    }

    #[test]
    fn links_sum_over_channels_each_way_in_order_of_appearance() {
        use crate::transport::LinkStats;
        let (a, b) = ("198.18.1.1".parse().unwrap(), "198.18.2.1".parse().unwrap());
        let at = |link, sockets, bytes, errors| LinkStats { link, sockets, bytes, pieces: bytes / 100, errors };
        let sent = [at(b, 2, 1000, 0), at(a, 1, 500, 1), at(b, 2, 300, 0)];
        let received = [at(a, 1, 700, 0)];
        let t = link_totals(&sent, &received);
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].link, t[0].out.sockets, t[0].out.bytes, t[0].out.pieces, t[0].inbound),
            (b, 4, 1300, 13, LinkWay::default())
        );
        assert_eq!(
            (t[1].link, t[1].out.bytes, t[1].out.errors, t[1].inbound.bytes, t[1].inbound.sockets),
            (a, 500, 1, 700, 1)
        );
        assert!(link_totals(&[], &[]).is_empty());
    }
}
