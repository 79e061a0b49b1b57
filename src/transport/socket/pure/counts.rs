//! How many data sockets a net's comms hold, and what became of the sockets comms added after
//! connect: gauges and totals over every comm of one `SocketNet`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Counts {
    sending: AtomicU64,
    receiving: AtomicU64,
    added: AtomicU64,
    given_up: AtomicU64,
    refused: AtomicU64,
}

/// A snapshot of a net's data sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataSocketStats {
    /// Sockets of send comms that carry pieces now (connected, and acknowledged if added later).
    pub sending: u64,
    /// Sockets of receive comms that read pieces now.
    pub receiving: u64,
    /// Sockets send comms opened after connect, as their traffic asked for them (a total).
    pub added: u64,
    /// Added sockets a send comm gave up on: the connect failed, or the peer refused or closed it
    /// before acknowledging it (a total).
    pub given_up: u64,
    /// Sockets listeners refused after their comm was handed out: a stranger, a duplicate, a closed
    /// comm, a hello that contradicts the comm's first socket (a total).
    pub refused: u64,
}

impl Counts {
    pub fn snapshot(&self) -> DataSocketStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DataSocketStats {
            sending: get(&self.sending),
            receiving: get(&self.receiving),
            added: get(&self.added),
            given_up: get(&self.given_up),
            refused: get(&self.refused),
        }
    }

    pub fn opened_sending(&self, n: u64) {
        self.sending.fetch_add(n, Ordering::Relaxed);
    }

    pub fn closed_sending(&self, n: u64) {
        self.sending.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn opened_receiving(&self, n: u64) {
        self.receiving.fetch_add(n, Ordering::Relaxed);
    }

    pub fn closed_receiving(&self, n: u64) {
        self.receiving.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn added(&self) {
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    pub fn gave_up(&self) {
        self.given_up.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}
