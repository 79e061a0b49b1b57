//! Hedged sends on a comm over several data links. Sockets take pieces as their link drains, yet
//! the last pieces of a request still sit behind whatever a slow link's sockets queued: the
//! request ends when the slow link delivers them, while the fast links idle. A socket that finds
//! nothing new to cut sends a copy of such a piece instead: one still queued on a link at most half
//! as fast, due there later than the copy would arrive. The receiver lands whichever copy comes first
//! and reads the other past (or takes a partly landed piece over), so a copy costs bytes, never
//! correctness. Each piece is copied at most once, and only pieces of requests cut to their end,
//! so a healthy comm sends few copies and only at a request's end.

use std::net::{IpAddr, TcpStream};
use std::sync::atomic::Ordering;

use super::SendSockets;
use super::kept::tcp_info;
use crate::transport::socket::window::{Piece, PieceMem};

/// A copy goes only to a socket this many times faster than the holder: links of about one rate
/// never copy each other's pieces.
const MARGIN: f64 = 2.0;
/// Nor where it would arrive less than this (seconds) sooner than the holder delivers the piece.
const MIN_GAIN: f64 = 0.002;

/// How fast a socket drains: bytes it holds for its link and not delivered yet, and its rate
/// (bytes per second): what it carried since it opened, over that time. Sockets pull pieces as
/// their link drains, so this follows the link's share; the kernel's own delivery rate, one
/// recent sample, swings tenfold on a shaped link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Drain {
    pub queued: u64,
    pub rate: u64,
}

impl Drain {
    /// Seconds until `extra` bytes behind the queue are delivered; `None` before any measure.
    fn eta(&self, extra: u64) -> Option<f64> {
        (self.rate > 0).then(|| (self.queued + extra) as f64 / self.rate as f64)
    }
}

/// One candidate: a piece of an unacknowledged request another socket took, with that socket's
/// drain and the bytes it took after the piece (queued ahead of nothing, behind it).
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub piece: Piece,
    pub holder: Drain,
    pub after: u64,
}

/// Which of `held` (if any) socket `me` copies: among those still queued on a holder [`MARGIN`]
/// times slower than `me`, and due there [`MIN_GAIN`] later than a copy would arrive, one of the
/// oldest request, the latest due first.
pub(super) fn pick(me: Drain, held: &[Held]) -> Option<usize> {
    let mut best: Option<(usize, u64, f64)> = None;
    for (i, h) in held.iter().enumerate() {
        // Bytes of the holder's queue up to the piece's end: what it took later sits behind it.
        let Some(upto_end) = h.holder.queued.checked_sub(h.after).filter(|&b| b > 0) else { continue };
        let Some(there) = (Drain { queued: upto_end, rate: h.holder.rate }).eta(0) else { continue };
        let Some(here) = me.eta(h.piece.len as u64) else { continue };
        if there - here < MIN_GAIN || (h.holder.rate as f64) * MARGIN > me.rate as f64 {
            continue;
        }
        let better = match best {
            None => true,
            Some((_, seq, due)) => h.piece.seq < seq || (h.piece.seq == seq && there > due),
        };
        if better {
            best = Some((i, h.piece.seq, there));
        }
    }
    best.map(|(i, _, _)| i)
}

/// What the kernel holds for `stream`'s link and not delivered yet.
fn queued(stream: &TcpStream) -> Option<u64> {
    let info = tcp_info(stream)?;
    let in_flight = u64::from(info.tcpi_unacked) * u64::from(info.tcpi_snd_mss);
    Some(u64::from(info.tcpi_notsent_bytes) + in_flight)
}

fn link(stream: &TcpStream) -> Option<IpAddr> {
    stream.local_addr().ok().map(|a| a.ip())
}

impl SendSockets {
    fn drain(&self, k: usize) -> Option<Drain> {
        let secs = self.opened_at[k].get()?.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { (self.tally.bytes(k) as f64 / secs) as u64 } else { 0 };
        Some(Drain { queued: queued(self.stream(k))?, rate })
    }

    /// Acknowledged comms: a copy for socket `k`, which found nothing new to cut, of a piece
    /// another link's socket holds and would deliver much later ([`pick`]); kept by `k` as any
    /// piece it takes.
    pub(super) fn hedge(&self, k: usize) -> Option<(Piece, PieceMem)> {
        let upto = self.window.acked_upto();
        let mut candidates: Vec<(usize, Piece, u64)> = Vec::new();
        {
            let mut hedged = self.hedged.lock();
            hedged.retain(|&(seq, _)| seq >= upto);
            for j in (0..self.streams.len()).filter(|&j| j != k && self.open[j].load(Ordering::Acquire)) {
                let f = self.inflight[j].lock();
                let mut after = 0;
                for p in f.pieces.iter().rev() {
                    if p.seq >= upto && !hedged.contains(&(p.seq, p.offset)) {
                        candidates.push((j, *p, after));
                    }
                    after += p.len as u64;
                }
            }
        }
        if candidates.is_empty() {
            return None;
        }
        let mine = self.stream(k);
        let (me, my_link) = (self.drain(k)?, link(mine)?);
        let mut held = Vec::with_capacity(candidates.len());
        let mut holders: Vec<(usize, Option<Drain>)> = Vec::new();
        for (j, piece, after) in candidates {
            let holder = match holders.iter().find(|(h, _)| *h == j) {
                Some(&(_, d)) => d,
                None => {
                    let theirs = self.stream(j);
                    // The same link shares its bottleneck: a copy there arrives no sooner.
                    let d = if link(theirs) == Some(my_link) { None } else { self.drain(j) };
                    holders.push((j, d));
                    d
                }
            };
            if let Some(holder) = holder {
                held.push(Held { piece, holder, after });
            }
        }
        let piece = held[pick(me, &held)?].piece;
        let mem = self.window.hedgeable(&piece)?;
        {
            let mut hedged = self.hedged.lock();
            if hedged.contains(&(piece.seq, piece.offset)) {
                return None;
            }
            hedged.push((piece.seq, piece.offset));
        }
        log::debug!("socket {k} sends a copy of piece {}/{} held by a slower link", piece.seq, piece.offset);
        Some((piece, mem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn piece(seq: u64, offset: u64) -> Piece {
        Piece { seq, total: 32 * MB, offset, len: 256 << 10 }
    }

    #[test]
    fn a_piece_queued_on_a_slow_link_is_copied_by_a_fast_idle_one() {
        let fast = Drain { queued: 0, rate: 25 * MB };
        let slow = Drain { queued: MB, rate: 6 * MB / 4 };
        // The slow socket took three pieces: its newest is partly in its queue, the oldest gone.
        let held = [
            Held { piece: piece(3, 0), holder: slow, after: 2 * MB },
            Held { piece: piece(3, 256 << 10), holder: slow, after: 256 << 10 },
            Held { piece: piece(3, 512 << 10), holder: slow, after: 0 },
        ];
        assert_eq!(pick(fast, &held), Some(2), "the piece due last on the slow link");
        assert_eq!(pick(fast, &held[..2]), Some(1));
        assert_eq!(pick(fast, &held[..1]), None, "delivered already: nothing to gain");
        // An older request's piece goes first, even if due sooner.
        let older = Held { piece: piece(2, 0), holder: slow, after: 512 << 10 };
        assert_eq!(pick(fast, &[held[2], older]), Some(1));
    }

    #[test]
    fn links_of_one_rate_or_an_unmeasured_one_send_no_copy() {
        let idle = Drain { queued: 0, rate: 25 * MB };
        let peer = Drain { queued: 384 << 10, rate: 25 * MB };
        let held = [Held { piece: piece(0, 0), holder: peer, after: 0 }];
        assert_eq!(pick(idle, &held), None, "an equal link delivers about as soon");
        let busy = Drain { queued: 4 * MB, rate: 25 * MB };
        let slow = Drain { queued: MB, rate: 6 * MB };
        assert_eq!(pick(busy, &[Held { piece: piece(0, 0), holder: slow, after: 0 }]), None, "busy itself");
        // Due much later, but on a link as fast: its queue is the cause, which a copy shares.
        let deep = Drain { queued: 4 * MB, rate: 25 * MB };
        assert_eq!(pick(idle, &[Held { piece: piece(0, 0), holder: deep, after: 0 }]), None);
        // Loopback-fast links: a gain of microseconds is not worth a copy.
        let quick = Drain { queued: 0, rate: 4000 * MB };
        let queue = Drain { queued: 512 << 10, rate: 1000 * MB };
        assert_eq!(pick(quick, &[Held { piece: piece(0, 0), holder: queue, after: 0 }]), None);
        let unmeasured = Drain { queued: MB, rate: 0 };
        assert_eq!(pick(idle, &[Held { piece: piece(0, 0), holder: unmeasured, after: 0 }]), None);
        assert_eq!(pick(Drain { queued: 0, rate: 0 }, &[Held { piece: piece(0, 0), holder: slow, after: 0 }]), None);
    }
}
