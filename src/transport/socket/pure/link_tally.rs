//! What each data socket of a comm carried: bytes and pieces moved, errors met. Summed by link
//! (the socket's local address: its data link where `SOCKET_IFNAME` names links, else the engine's
//! address) when asked, and logged once when the comm closes, so an operator sees how a comm's
//! traffic spread over the links and which link failed it.
//!
//! A socket's counters are written only by whoever moves its pieces at that moment (its helper,
//! or the posting thread for an inline send, which holds the socket's claim meanwhile): relaxed
//! atomic adds on a cache line no other socket writes, no lock. Readers see each counter as it
//! stood at some moment; totals are exact once the comm's helpers let go of its sockets.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::transport::LinkStats;

/// One socket's counters, on a cache line of their own: the sockets of a comm run on different
/// helpers, which would otherwise write the same line for every piece.
#[derive(Default)]
#[repr(align(64))]
struct SocketTally {
    bytes: AtomicU64,
    pieces: AtomicU64,
    errors: AtomicU64,
}

/// The counters of a comm's sockets, socket `k` at index `k`.
pub(crate) struct Tallies {
    sockets: Box<[SocketTally]>,
}

impl Tallies {
    pub fn new(sockets: usize) -> Tallies {
        Tallies { sockets: (0..sockets).map(|_| SocketTally::default()).collect() }
    }

    /// Socket `k` moved a whole piece of `len` payload bytes.
    pub fn piece(&self, k: usize, len: usize) {
        let t = &self.sockets[k];
        t.bytes.fetch_add(len as u64, Ordering::Relaxed);
        t.pieces.fetch_add(1, Ordering::Relaxed);
    }

    /// Socket `k` failed (an I/O error, a protocol violation, or an added socket given up).
    pub fn error(&self, k: usize) {
        self.sockets[k].errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters summed per link, in the order the links first appear among `links`, the
    /// placed sockets with their local addresses (a socket not placed yet, as a comm grows as its
    /// traffic asks, counts nowhere).
    pub fn by_link(&self, links: impl Iterator<Item = (usize, Option<IpAddr>)>) -> Vec<LinkStats> {
        sum_by_link(&self.sockets, links)
    }
}

/// Adds up `sockets`' counters by the link each of `links` names (`None`: a socket whose address
/// could not be read, a closed one, counted under the unspecified address).
fn sum_by_link(sockets: &[SocketTally], links: impl Iterator<Item = (usize, Option<IpAddr>)>) -> Vec<LinkStats> {
    let mut out: Vec<LinkStats> = Vec::new();
    for (k, link) in links {
        let link = link.unwrap_or(IpAddr::from([0u8; 4]));
        let i = match out.iter().position(|l| l.link == link) {
            Some(i) => i,
            None => {
                out.push(LinkStats { link, sockets: 0, bytes: 0, pieces: 0, errors: 0 });
                out.len() - 1
            }
        };
        let (l, t) = (&mut out[i], &sockets[k]);
        l.sockets += 1;
        l.bytes += t.bytes.load(Ordering::Relaxed);
        l.pieces += t.pieces.load(Ordering::Relaxed);
        l.errors += t.errors.load(Ordering::Relaxed);
    }
    out
}

/// One log line for a closing comm: each link's sockets, bytes, pieces and errors.
pub(crate) fn log_closed(side: &str, links: &[LinkStats]) {
    if links.is_empty() {
        return;
    }
    let each: Vec<String> = links
        .iter()
        .map(|l| {
            format!("{}: {} sockets, {} bytes in {} pieces, {} errors", l.link, l.sockets, l.bytes, l.pieces, l.errors)
        })
        .collect();
    log::info!("{side} comm closed; per data link: {}", each.join("; "));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sockets on one link add up, links stay apart in the order they first appear, and an
    /// unreadable address is counted, not dropped.
    #[test]
    fn counters_sum_per_link() {
        let t = Tallies::new(4);
        t.piece(0, 100);
        t.piece(0, 50);
        t.piece(1, 7);
        t.piece(2, 1000);
        t.error(2);
        t.error(3);
        let a: IpAddr = [198, 18, 1, 1].into();
        let b: IpAddr = [198, 18, 2, 1].into();
        let links = [(0, Some(a)), (1, Some(b)), (2, Some(a)), (3, None)].into_iter();
        let got = sum_by_link(&t.sockets, links);
        assert_eq!(
            got,
            vec![
                LinkStats { link: a, sockets: 2, bytes: 1150, pieces: 3, errors: 1 },
                LinkStats { link: b, sockets: 1, bytes: 7, pieces: 1, errors: 0 },
                LinkStats { link: IpAddr::from([0u8; 4]), sockets: 1, bytes: 0, pieces: 0, errors: 1 },
            ]
        );
    }

    /// Each socket's counters sit on a line of their own, so helpers of one comm never write the
    /// same cache line for their pieces.
    #[test]
    fn each_socket_has_its_own_cache_line() {
        assert_eq!(std::mem::align_of::<SocketTally>(), 64);
        let t = Tallies::new(2);
        let (p0, p1) = (&t.sockets[0] as *const _ as usize, &t.sockets[1] as *const _ as usize);
        assert!(p1 - p0 >= 64);
    }
}
