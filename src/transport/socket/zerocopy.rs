//! MSG_ZEROCOPY sends: the kernel pins the caller's pages instead of copying them, and says on the
//! socket's error queue when it let go of them. Each successful zero-copy `sendmsg` on a socket gets
//! the next 32-bit id; notifications report ranges of ids. A piece sent this way is not finished (so
//! its request is not reported done, and the caller may not reuse the buffer) until every id up to
//! its last one has been reported.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::window::Piece;

// From <linux/socket.h> and <linux/errqueue.h>; the libc crate lacks them. SO_ZEROCOPY is the
// asm-generic value, which every architecture this crate builds for uses.
const SO_ZEROCOPY: libc::c_int = 60;
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// What the zero-copy path did, summed over every send comm of one `SocketNet`.
#[derive(Default)]
pub(super) struct Counters {
    sends: AtomicU64,
    completed: AtomicU64,
    copied: AtomicU64,
    fallbacks: AtomicU64,
    refused: AtomicU64,
    pieces: AtomicU64,
    held: AtomicU64,
    /// Test hooks: refuse SO_ZEROCOPY; fail every Nth zero-copy send with ENOBUFS before the kernel
    /// sees it (neither is reliably provoked from a test on a stock kernel).
    #[cfg(test)]
    pub refuse_enable: std::sync::atomic::AtomicBool,
    #[cfg(test)]
    pub enobufs_every: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroCopyStats {
    /// `sendmsg` calls the kernel accepted with MSG_ZEROCOPY (each got a notification id).
    pub sends: u64,
    /// Ids the error queue reported complete.
    pub completed: u64,
    /// Of those, ids whose data the kernel copied after all (loopback always does).
    pub copied: u64,
    /// Sends refused with ENOBUFS (too many notifications outstanding) and sent as a copy instead.
    pub enobufs_fallbacks: u64,
    /// Sockets that refused SO_ZEROCOPY and send with copies.
    pub refused_sockets: u64,
    /// Pieces fully written with at least one zero-copy send.
    pub pieces_sent: u64,
    /// Pieces fully written whose completions have not all arrived yet (so their requests are not
    /// done): a gauge, not a total.
    pub pieces_held: u64,
}

impl Counters {
    pub fn snapshot(&self) -> ZeroCopyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ZeroCopyStats {
            sends: get(&self.sends),
            completed: get(&self.completed),
            copied: get(&self.copied),
            enobufs_fallbacks: get(&self.fallbacks),
            refused_sockets: get(&self.refused),
            pieces_sent: get(&self.pieces),
            pieces_held: get(&self.held),
        }
    }

    pub fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Test hook: whether this zero-copy send is to fail with ENOBUFS.
    #[cfg(test)]
    pub fn inject_enobufs(&self) -> bool {
        let every = self.enobufs_every.load(Ordering::Relaxed);
        every != 0
            && (self.sends.load(Ordering::Relaxed) + self.fallbacks.load(Ordering::Relaxed)).is_multiple_of(every)
    }

    #[cfg(not(test))]
    pub fn inject_enobufs(&self) -> bool {
        false
    }
}

/// Turns SO_ZEROCOPY on; false (counted, logged) if the kernel refuses, and the socket copies.
pub(super) fn enable(fd: RawFd, counters: &Counters) -> bool {
    #[cfg(test)]
    let refused_by_test = counters.refuse_enable.load(Ordering::Relaxed);
    #[cfg(not(test))]
    let refused_by_test = false;
    let one: libc::c_int = 1;
    let rc = if refused_by_test {
        -1
    } else {
        // SAFETY: passes a pointer to a live c_int and its size; fd is the caller's open socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if rc == 0 {
        return true;
    }
    let why =
        if refused_by_test { "refused by a test".to_owned() } else { std::io::Error::last_os_error().to_string() };
    if counters.refused.fetch_add(1, Ordering::Relaxed) == 0 {
        log::warn!("the kernel refused SO_ZEROCOPY on a data socket ({why}); sending with copies");
    }
    false
}

/// A send socket's zero-copy bookkeeping, owned by the helper thread that serves the socket.
#[derive(Default)]
pub(super) struct ZcSocket {
    pub enabled: bool,
    /// Ids handed out so far: the next zero-copy send gets `issued` (mod 2^32).
    pub issued: u64,
    done: Completions,
    /// Pieces fully written whose pages the kernel may still read, with the id after their last.
    pending: VecDeque<(Piece, u64)>,
}

impl ZcSocket {
    pub fn new(enabled: bool) -> ZcSocket {
        ZcSocket { enabled, ..ZcSocket::default() }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A fully written piece that used ids up to `issued`: finished once they are all reported.
    pub fn hold(&mut self, piece: Piece, counters: &Counters) {
        self.pending.push_back((piece, self.issued));
        counters.pieces.fetch_add(1, Ordering::Relaxed);
        counters.held.fetch_add(1, Ordering::Relaxed);
    }

    /// Pieces whose every id has been reported, oldest first.
    pub fn released<'a>(&'a mut self, counters: &'a Counters) -> impl Iterator<Item = Piece> + 'a {
        let below = self.done.below;
        std::iter::from_fn(move || {
            let (_, end) = self.pending.front()?;
            if *end > below {
                return None;
            }
            counters.held.fetch_sub(1, Ordering::Relaxed);
            self.pending.pop_front().map(|(piece, _)| piece)
        })
    }

    /// The comm is going away: its held pieces will never finish.
    pub fn abandon(&mut self, counters: &Counters) {
        counters.held.fetch_sub(self.pending.len() as u64, Ordering::Relaxed);
        self.pending.clear();
    }

    /// Reads every notification queued on the socket's error queue without blocking. Returns
    /// whether any id was reported.
    pub fn reap(&mut self, fd: RawFd, counters: &Counters) -> std::io::Result<bool> {
        let mut any = false;
        loop {
            // u64 elements keep the control buffer aligned for cmsghdr.
            let mut control = [0u64; 16];
            // SAFETY: an all-zero msghdr is valid; it points at nothing but our control buffer.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: `msg` describes valid memory for the call's duration.
            let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return Ok(any),
                    _ => return Err(e),
                }
            }
            // SAFETY: the kernel filled `msg_controllen` bytes of `control` with cmsgs; the CMSG
            // macros stay inside that length.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: non-null cmsg pointers from the CMSG macros lie inside `control`.
                let c = unsafe { &*cmsg };
                let is_err = matches!(
                    (c.cmsg_level, c.cmsg_type),
                    (libc::SOL_IP, libc::IP_RECVERR) | (libc::SOL_IPV6, libc::IPV6_RECVERR)
                );
                let fits = c.cmsg_len as usize
                    // SAFETY: CMSG_LEN only computes a length from its argument; it reads no memory.
                    >= unsafe { libc::CMSG_LEN(std::mem::size_of::<libc::sock_extended_err>() as u32) } as usize;
                if is_err && fits {
                    // SAFETY: the length check above covers a sock_extended_err; it may be unaligned.
                    let ee: libc::sock_extended_err = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                    if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                        let ids = self.done.add(ee.ee_info, ee.ee_data, self.issued);
                        counters.completed.fetch_add(ids, Ordering::Relaxed);
                        if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                            counters.copied.fetch_add(ids, Ordering::Relaxed);
                        }
                        any |= ids > 0;
                    } else {
                        log::debug!("ignoring an error-queue entry of origin {} errno {}", ee.ee_origin, ee.ee_errno);
                    }
                }
                // SAFETY: as above.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
        }
    }

    /// Counts a zero-copy send the kernel accepted.
    pub fn sent(&mut self, counters: &Counters) {
        self.issued += 1;
        counters.sends.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which ids have been reported: all below `below`, plus ranges reported out of order beyond it.
#[derive(Default, Debug)]
pub(super) struct Completions {
    below: u64,
    /// Half-open ranges above `below`, not touching it.
    ahead: Vec<(u64, u64)>,
}

impl Completions {
    /// Records the inclusive 32-bit id range `lo..=hi` against `issued` ids so far; returns how many
    /// new ids it covered. Ids not issued yet or already reported are ignored (a kernel never sends
    /// them; trusting them would release pages early).
    pub fn add(&mut self, lo: u32, hi: u32, issued: u64) -> u64 {
        let outstanding = issued - self.below;
        let start_off = lo.wrapping_sub(self.below as u32) as u64;
        let len = hi.wrapping_sub(lo) as u64 + 1;
        if start_off >= outstanding || start_off + len > outstanding {
            log::warn!("ignoring a zero-copy completion for ids {lo}..={hi}, which were not all outstanding");
            return 0;
        }
        let (start, end) = (self.below + start_off, self.below + start_off + len);
        if self.ahead.iter().any(|&(a, b)| start < b && a < end) {
            log::warn!("ignoring a repeated zero-copy completion for ids {lo}..={hi}");
            return 0;
        }
        self.ahead.push((start, end));
        // Fold every range that now touches `below`.
        while let Some(i) = self.ahead.iter().position(|&(a, _)| a == self.below) {
            self.below = self.ahead.swap_remove(i).1;
        }
        len
    }

    #[cfg(test)]
    pub fn below(&self) -> u64 {
        self.below
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_fold_in_any_order_and_bad_ones_are_ignored() {
        let mut c = Completions::default();
        assert_eq!(c.add(0, 0, 10), 1);
        assert_eq!(c.below(), 1);
        assert_eq!(c.add(4, 6, 10), 3, "out of order: held aside");
        assert_eq!(c.below(), 1);
        assert_eq!(c.add(1, 3, 10), 3);
        assert_eq!(c.below(), 7, "the gap closed and the held range folded in");
        assert_eq!(c.add(5, 5, 10), 0, "already reported");
        assert_eq!(c.add(9, 10, 10), 0, "id 10 was never issued");
        assert_eq!(c.add(8, 9, 10), 2);
        assert_eq!(c.add(7, 7, 10), 1);
        assert_eq!(c.below(), 10);
        assert_eq!(c.add(9, 9, 10), 0, "nothing is outstanding");
    }

    #[test]
    fn ids_wrap_at_32_bits() {
        let wrap = 1u64 << 32;
        let mut c = Completions { below: wrap - 2, ahead: Vec::new() };
        // Ids u32::MAX - 1, u32::MAX, 0, 1 are the 64-bit ids 2^32 - 2 ..= 2^32 + 1.
        assert_eq!(c.add(u32::MAX - 1, 1, wrap + 3), 4);
        assert_eq!(c.below(), wrap + 2);
    }

    #[test]
    fn pieces_are_released_only_after_their_last_id() {
        let piece = |seq| Piece { seq, total: 1, offset: 0, len: 1 };
        let counters = Counters::default();
        let mut s = ZcSocket::new(true);
        s.sent(&counters);
        s.sent(&counters);
        s.hold(piece(0), &counters);
        s.sent(&counters);
        s.hold(piece(1), &counters);
        assert_eq!(counters.snapshot().pieces_held, 2);
        assert_eq!(s.released(&counters).count(), 0);
        s.done.add(0, 0, s.issued);
        assert_eq!(s.released(&counters).count(), 0, "piece 0 also used id 1");
        s.done.add(2, 2, s.issued);
        assert_eq!(s.released(&counters).count(), 0, "id 1 is still out");
        s.done.add(1, 1, s.issued);
        let seqs: Vec<u64> = s.released(&counters).map(|p| p.seq).collect();
        assert_eq!(seqs, [0, 1]);
        assert!(!s.has_pending());
        assert_eq!(counters.snapshot().pieces_held, 0);
    }
}
