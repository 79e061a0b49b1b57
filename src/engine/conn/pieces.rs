//! A one-sided call given as runs of pieces: the caller (the NIXL backend) has already grouped its
//! items by local region and remote capability, so each run names its region and capability once
//! and its pieces are three numbers each. The call checks and groups the pieces in one pass, with
//! one region lookup and one capability parse per run, and builds each request's segment lists
//! straight from the caller's pieces: nothing per piece is copied before that, where the item form
//! (`api.rs`) takes a 64-byte capability per item and a copy of the whole list first.

use std::ops::Range;

use super::Connection;
use super::api::{CheckedRun, ItemList, RunHead};
use super::vector::{Grouper, Push, RunKey};
use crate::engine::region::{Region, check_range};
use crate::error::{Error, Result};
use crate::proto::FifoItem;
use crate::trace::{self, clock_ns};
use crate::transport::IoSeg;

/// `len` bytes at `local` in the run's region and at `remote` in the peer's, where the run's
/// capability grants them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// `pieces` consecutive pieces of a call, all between local region `mr` and the peer range that
/// `remote` grants (its address and size bound every piece's remote range; its padding names the
/// capability).
#[derive(Clone, Copy, Debug)]
pub struct PieceRun {
    pub mr: u64,
    pub remote: FifoItem,
    pub pieces: usize,
}

impl ItemList for [Piece] {
    fn local(&self, i: usize) -> IoSeg {
        IoSeg { addr: self[i].local as usize, len: self[i].len as usize }
    }

    fn remote_addr(&self, i: usize) -> u64 {
        self[i].remote
    }
}

impl Connection {
    /// Writes `pieces`, which `runs` divide among regions and capabilities in order.
    pub fn write_pieces(&self, runs: &[PieceRun], pieces: &[Piece]) -> Result<u64> {
        self.traced_return(self.post_pieces(runs, pieces, true))
    }

    /// Reads into `pieces`, which `runs` divide among regions and capabilities in order.
    pub fn read_pieces(&self, runs: &[PieceRun], pieces: &[Piece]) -> Result<u64> {
        self.traced_return(self.post_pieces(runs, pieces, false))
    }

    fn post_pieces(&self, runs: &[PieceRun], pieces: &[Piece], write: bool) -> Result<u64> {
        let verb = if write { "write" } else { "read" };
        let posted = trace::on(trace::DEVICE | trace::FLOW).then(clock_ns);
        let checked = self.check_pieces(runs, pieces, verb)?;
        self.post_runs(pieces, &checked, write, posted, verb)
    }

    /// Every piece checked (inside its run's local region and inside the range its run's
    /// capability grants), and the requests' runs they form, in one pass over the pieces.
    fn check_pieces(&self, runs: &[PieceRun], pieces: &[Piece], verb: &str) -> Result<Vec<CheckedRun>> {
        let total = runs.iter().try_fold(0usize, |n, run| n.checked_add(run.pieces));
        if total != Some(pieces.len()) {
            return Err(Error::invalid(format!(
                "the runs' piece counts do not add up to the {} pieces given",
                pieces.len()
            )));
        }
        if pieces.is_empty() {
            return Err(Error::invalid("nothing to transfer: zero pieces"));
        }
        let mut grouper = Grouper::default();
        let mut open: Option<RunHead> = None;
        let mut out = Vec::new();
        let mut at = 0;
        for (r, run) in runs.iter().enumerate() {
            let ctx = |e: Error| e.context(format!("{verb} run {r}"));
            let span = at..at + run.pieces;
            at = span.end;
            if span.is_empty() {
                return Err(ctx(Error::invalid("a run of zero pieces")));
            }
            let region = self.core.regions.get(run.mr).map_err(ctx)?;
            self.channels_take(&region).map_err(ctx)?;
            let cap = run.remote.capability().map_err(|e| ctx(Error::invalid(e.to_string())))?;
            let granted = grant(&run.remote).map_err(ctx)?;
            let key = RunKey { local_region: region.id, remote_region: cap.region, token: cap.token };
            let token = self.wire_token(cap.region, cap.token);
            for i in span {
                let p = &pieces[i];
                let local_ok =
                    p.local != 0 && p.len != 0 && p.local.checked_add(p.len).is_some() && in_region(&region, p);
                if !local_ok || !within(&granted, p.remote, p.len) {
                    return Err(ctx(piece_error(&region, &granted, p, i)));
                }
                // A new request starts at a run's first piece (unless the run continues the request
                // before it: same regions and capability) and at a cut at the request limits.
                if let Push::Started(finished) = grouper.push(key, p.len) {
                    let started =
                        RunHead { region: region.clone(), remote_region: cap.region, remote_place: cap.place, token };
                    if let (Some(done), Some(run)) = (open.replace(started), finished) {
                        out.push(CheckedRun { head: done, run });
                    }
                }
            }
        }
        if let (Some(done), Some(run)) = (open, grouper.finish()) {
            out.push(CheckedRun { head: done, run });
        }
        Ok(out)
    }
}

#[inline]
fn in_region(region: &Region, p: &Piece) -> bool {
    usize::try_from(p.local).is_ok_and(|a| usize::try_from(p.len).is_ok_and(|n| region.contains(a, n)))
}

/// The remote range a run's capability grants.
fn grant(item: &FifoItem) -> Result<Range<u64>> {
    let end = item
        .addr
        .checked_add(u64::from(item.size))
        .ok_or_else(|| Error::invalid(format!("remote range {:#x} + {} bytes wraps around", item.addr, item.size)))?;
    Ok(item.addr..end)
}

#[inline]
fn within(granted: &Range<u64>, addr: u64, len: u64) -> bool {
    addr >= granted.start && addr <= granted.end && len <= granted.end - addr
}

/// Why piece `i` was refused.
fn piece_error(region: &Region, granted: &Range<u64>, p: &Piece, i: usize) -> Error {
    let local = usize::try_from(p.local).ok().zip(usize::try_from(p.len).ok());
    let why = match local.map(|(a, n)| check_range(a, n)) {
        None => format!("{} bytes at {:#x} do not fit the address space", p.len, p.local),
        Some(Err(e)) => e.message().to_string(),
        Some(Ok(())) if !in_region(region, p) => format!(
            "buffer [{:#x}, +{}) lies outside memory region {} [{:#x}, +{})",
            p.local, p.len, region.id, region.base, region.len
        ),
        Some(Ok(())) => format!(
            "remote range [{:#x}, +{}) lies outside the [{:#x}, {:#x}) its FifoItem grants",
            p.remote, p.len, granted.start, granted.end
        ),
    };
    Error::invalid(format!("piece {i}: {why}"))
}
