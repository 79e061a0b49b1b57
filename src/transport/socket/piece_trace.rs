//! Opt-in per-socket timeline of a comm's requests (`UCCL_TCPX_TRACE_SOCKETS=<prefix>`): for each
//! request and socket, when the socket took its first piece of it and finished its last (sender),
//! or read its first header, had it admitted and landed its last piece (receiver), with its bytes
//! and pieces, in CLOCK_MONOTONIC ns so both processes of a host compare. The engine's flow trace
//! times whole writes; this shows how a comm's sockets shared them and where a piece waited.
//!
//! A fixed table of the last `REQUESTS` requests per comm, allocated when the comm is made: no
//! allocation per piece. A cell is written only by whoever runs its socket at the moment (the
//! socket's claim or its helper orders them), so relaxed atomics suffice; the comm's drop reads
//! them once its helpers let go of its sockets and writes
//! `<prefix>.<pid>.<comm id>.<send|recv>.tsv`, the comm id being the one both ends' hellos carry.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::trace::clock_ns;

/// Requests kept per comm: a cell is reused by the request this many later.
const REQUESTS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dir {
    Send,
    Recv,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Send => "send",
            Dir::Recv => "recv",
        }
    }
}

/// One socket's share of one request. Sender: `start` = first piece cut, `admitted` unused.
/// Receiver: `start` = first header read.
#[derive(Default)]
struct Cell {
    /// The request's seq + 1; 0 = empty.
    tag: AtomicU64,
    start: AtomicU64,
    admitted: AtomicU64,
    last: AtomicU64,
    bytes: AtomicU64,
    pieces: AtomicU64,
}

pub(super) struct PieceTrace {
    prefix: String,
    comm_id: u64,
    dir: Dir,
    sockets: usize,
    cells: Box<[Cell]>,
}

impl PieceTrace {
    /// A trace of a comm of `sockets` sockets, or `None` when `prefix` is unset.
    pub fn new(prefix: Option<&str>, comm_id: u64, dir: Dir, sockets: usize) -> Option<PieceTrace> {
        let prefix = prefix.filter(|p| !p.is_empty())?;
        let cells = (0..REQUESTS * sockets).map(|_| Cell::default()).collect();
        Some(PieceTrace { prefix: prefix.to_string(), comm_id, dir, sockets, cells })
    }

    /// Socket `k`'s cell of request `seq`, emptied first if an older request held it.
    fn cell(&self, k: usize, seq: u64) -> &Cell {
        let c = &self.cells[(seq as usize % REQUESTS) * self.sockets + k];
        if c.tag.load(Relaxed) != seq + 1 {
            for f in [&c.start, &c.admitted, &c.last, &c.bytes, &c.pieces] {
                f.store(0, Relaxed);
            }
            c.tag.store(seq + 1, Relaxed);
        }
        c
    }

    /// Socket `k` took a piece of request `seq` (sender) or read its header (receiver).
    pub fn began(&self, k: usize, seq: u64) {
        let c = self.cell(k, seq);
        if c.start.load(Relaxed) == 0 {
            c.start.store(clock_ns(), Relaxed);
        }
    }

    /// Socket `k`'s piece of request `seq` was admitted into the posted receive.
    pub fn admitted(&self, k: usize, seq: u64) {
        let c = self.cell(k, seq);
        if c.admitted.load(Relaxed) == 0 {
            c.admitted.store(clock_ns(), Relaxed);
        }
    }

    /// Socket `k` finished (sender) or landed (receiver) a piece of `len` bytes of request `seq`.
    pub fn done(&self, k: usize, seq: u64, len: usize) {
        let c = self.cell(k, seq);
        c.last.store(clock_ns(), Relaxed);
        c.bytes.fetch_add(len as u64, Relaxed);
        c.pieces.fetch_add(1, Relaxed);
    }

    /// The table as TSV: a header line and a row per (seq, socket) that finished a piece, by seq,
    /// for the last `REQUESTS` requests only: a later request takes over only the cells of the
    /// sockets it used, and an older request's other cells would pass for a request on fewer sockets.
    fn render(&self) -> String {
        let mut rows: Vec<(u64, usize, &Cell)> = (0..self.cells.len())
            .map(|i| (i % self.sockets, &self.cells[i]))
            .filter(|(_, c)| c.tag.load(Relaxed) != 0 && c.pieces.load(Relaxed) > 0)
            .map(|(k, c)| (c.tag.load(Relaxed) - 1, k, c))
            .collect();
        let newest = rows.iter().map(|&(seq, _, _)| seq).max().unwrap_or(0);
        rows.retain(|&(seq, _, _)| seq + REQUESTS as u64 > newest);
        rows.sort_by_key(|&(seq, k, _)| (seq, k));
        let mut out = String::from(match self.dir {
            Dir::Send => "seq\tsocket\tstart_ns\tlast_ns\tbytes\tpieces\n",
            Dir::Recv => "seq\tsocket\theader_ns\tadmitted_ns\tlast_ns\tbytes\tpieces\n",
        });
        for (seq, k, c) in rows {
            let (start, last, bytes, pieces) =
                (c.start.load(Relaxed), c.last.load(Relaxed), c.bytes.load(Relaxed), c.pieces.load(Relaxed));
            let _ = match self.dir {
                Dir::Send => writeln!(out, "{seq}\t{k}\t{start}\t{last}\t{bytes}\t{pieces}"),
                Dir::Recv => {
                    let admitted = c.admitted.load(Relaxed);
                    writeln!(out, "{seq}\t{k}\t{start}\t{admitted}\t{last}\t{bytes}\t{pieces}")
                }
            };
        }
        out
    }

    /// Where this comm's table goes.
    pub fn path(&self) -> String {
        format!("{}.{}.{:016x}.{}.tsv", self.prefix, std::process::id(), self.comm_id, self.dir.name())
    }

    /// Writes the table; called once the comm's sockets are no longer run. A failure is logged (once
    /// a process at warning level) and otherwise ignored: the trace never fails a comm.
    pub fn write(&self) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        let path = self.path();
        if let Err(e) = std::fs::write(&path, self.render()) {
            if WARNED.swap(true, Relaxed) {
                log::debug!("could not write the socket trace {path}: {e}");
            } else {
                log::warn!("could not write the socket trace {path}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_a_prefix() {
        assert!(PieceTrace::new(None, 1, Dir::Send, 4).is_none());
        assert!(PieceTrace::new(Some(""), 1, Dir::Send, 4).is_none());
    }

    #[test]
    fn keeps_first_start_and_sums_pieces_and_reuses_old_cells() {
        let t = PieceTrace::new(Some("/nonexistent/x"), 0xab, Dir::Recv, 2).unwrap();
        t.began(1, 3);
        t.admitted(1, 3);
        t.done(1, 3, 100);
        t.began(1, 3);
        t.admitted(1, 3);
        t.done(1, 3, 50);
        t.began(0, 4);
        let text = t.render();
        let rows: Vec<Vec<u64>> =
            text.lines().skip(1).map(|l| l.split('\t').map(|f| f.parse().unwrap()).collect()).collect();
        assert_eq!(rows.len(), 1, "a socket that finished no piece has no row: {text}");
        let r = &rows[0];
        assert_eq!((r[0], r[1], r[5], r[6]), (3, 1, 150, 2));
        assert!(r[2] <= r[3] && r[3] <= r[4], "header <= admitted <= last: {r:?}");
        // The request REQUESTS later takes the cell over, starting empty.
        t.done(1, 3 + REQUESTS as u64, 7);
        let text = t.render();
        assert!(text.lines().nth(1).unwrap().starts_with(&format!("{}\t1\t0\t0\t", 3 + REQUESTS)), "{text}");
        assert!(t.path().ends_with(&format!(".{}.00000000000000ab.recv.tsv", std::process::id())));
        // An unwritable prefix is logged, not a panic.
        t.write();
    }

    #[test]
    fn a_request_older_than_the_table_leaves_no_partial_rows() {
        let t = PieceTrace::new(Some("/nonexistent/x"), 1, Dir::Send, 4).unwrap();
        // Request 5 on all four sockets, then request 5 + REQUESTS on socket 0 only: socket 0's
        // cell is taken over, sockets 1-3 still hold request 5's.
        for k in 0..4 {
            t.began(k, 5);
            t.done(k, 5, 10);
        }
        let later = 5 + REQUESTS as u64;
        t.began(0, later);
        t.done(0, later, 10);
        let text = t.render();
        let seqs: Vec<u64> = text.lines().skip(1).map(|l| l.split('\t').next().unwrap().parse().unwrap()).collect();
        assert_eq!(seqs, vec![later], "request 5 is past the table and gone whole: {text}");
        // Within the table both stay whole.
        t.began(1, later - 1);
        t.done(1, later - 1, 10);
        let text = t.render();
        assert_eq!(text.lines().count(), 3, "{text}");
    }
}
