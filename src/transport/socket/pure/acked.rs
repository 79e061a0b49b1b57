//! The bookkeeping of an acknowledged comm (one whose sockets span several data links), kept in
//! the window's book under its lock. The receiver counts a piece when it landed (not when its header
//! came), knows which socket lands each piece now, and reports its completed requests as one
//! cumulative count ([`Completions`]). A piece may come twice: the sender sends again what a socket
//! it declared dead carried, and that socket may still hold part of it. Landed already, the copy is
//! read past; still landing on another socket, the newcomer takes the piece over (the bytes are the
//! same and land at the same offset) and the other socket reads the rest of its copy past. A
//! request completes once every piece landed, each counted once.

/// The receiver's requests completed so far: every request below `upto`, and those of `beyond`
/// (bit `i`: request `upto + 1 + i`), which completed out of order: fewer than [`REACH`] past
/// `upto`, as the window holds fewer requests.
#[derive(Default, Debug)]
pub(crate) struct Completions {
    upto: u64,
    beyond: u32,
}

/// Requests past the oldest incomplete one that may complete.
pub(crate) const REACH: u64 = 32;

impl Completions {
    /// Request `seq` (at or past `upto`, within the window) completed; returns the new count when
    /// it moved, for an acknowledgement.
    pub fn complete(&mut self, seq: u64) -> Option<u64> {
        debug_assert!(seq >= self.upto && seq - self.upto <= REACH);
        if seq != self.upto {
            self.beyond |= 1 << (seq - self.upto - 1);
            return None;
        }
        self.upto += 1;
        while self.beyond & 1 != 0 {
            self.beyond >>= 1;
            self.upto += 1;
        }
        self.beyond >>= 1;
        Some(self.upto)
    }

    pub fn upto(&self) -> u64 {
        self.upto
    }
}

/// A piece a receiving socket is landing: request and piece index.
pub(crate) type Claim = (u64, u64);

/// Which piece each receiving socket is landing, socket `k` at index `k`.
pub(crate) struct Claims {
    by_socket: Vec<Option<Claim>>,
}

/// What a receiving socket does with a piece of a request that is posted and not complete.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Land it: no socket is landing it.
    Land,
    /// Land it, taken over from that socket, which must stop writing it first.
    TakeOver(usize),
}

impl Claims {
    pub fn new(sockets: usize) -> Claims {
        Claims { by_socket: vec![None; sockets] }
    }

    /// Socket `k` lands `claim` (not landed yet); which socket had it.
    pub fn take(&mut self, k: usize, claim: Claim) -> Take {
        let from = self.by_socket.iter().position(|c| *c == Some(claim));
        self.by_socket[k] = Some(claim);
        match from {
            Some(other) if other != k => {
                self.by_socket[other] = None;
                Take::TakeOver(other)
            }
            _ => Take::Land,
        }
    }

    /// Socket `k` finished landing `claim`: whether it still held it (then it counts).
    pub fn finish(&mut self, k: usize, claim: Claim) -> bool {
        if self.by_socket[k] == Some(claim) {
            self.by_socket[k] = None;
            return true;
        }
        false
    }

    /// Socket `k` died: a copy of its piece may land elsewhere.
    pub fn drop_socket(&mut self, k: usize) {
        self.by_socket[k] = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_count_the_run_from_the_first_request() {
        let mut c = Completions::default();
        assert_eq!(c.complete(1), None, "request 0 is not complete");
        assert_eq!(c.complete(3), None);
        assert_eq!(c.complete(0), Some(2), "0 and 1");
        assert_eq!(c.complete(2), Some(4), "2 and 3");
        assert_eq!(c.complete(4), Some(5));
        for seq in (6..=20).rev() {
            assert_eq!(c.complete(seq), None);
        }
        assert_eq!(c.complete(5), Some(21));
        assert_eq!(c.upto(), 21);
    }

    #[test]
    fn a_second_copy_takes_a_piece_over_and_only_the_holder_counts_it() {
        let mut c = Claims::new(3);
        assert_eq!(c.take(0, (7, 2)), Take::Land);
        assert_eq!(c.take(1, (7, 3)), Take::Land);
        // Sent again on socket 2: it takes the piece from socket 0.
        assert_eq!(c.take(2, (7, 2)), Take::TakeOver(0));
        assert!(!c.finish(0, (7, 2)), "socket 0's copy no longer counts");
        assert!(c.finish(2, (7, 2)));
        assert!(c.finish(1, (7, 3)));
        // A dead socket's piece lands elsewhere without a takeover.
        assert_eq!(c.take(0, (8, 0)), Take::Land);
        c.drop_socket(0);
        assert_eq!(c.take(1, (8, 0)), Take::Land);
        assert!(c.finish(1, (8, 0)));
    }
}
