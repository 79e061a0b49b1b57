//! A one-sided call given as runs of pieces: the caller (the NIXL backend) has already grouped its
//! items by local region and remote capability, so each run names its region and capability once
//! and its pieces are three numbers each. The call checks the pieces in one pass, with one region
//! lookup and one capability parse per run. To a peer process of this host with GPU memory the
//! checked runs go to the copy kernel as they are; elsewhere they are grouped into requests whose
//! segment lists are built straight from the caller's pieces: nothing per piece is copied before
//! that, where the item form (`api.rs`) takes a 64-byte capability per item and a copy of the
//! whole list first.

use std::ops::Range;

use super::Connection;
use super::api::{CheckedRun, ItemList, RunHead};
use super::vector::{Grouper, Push, RunKey};
use crate::engine::locality::Locality;
use crate::engine::one_sided::CheckedPieces;
pub use crate::engine::one_sided::Piece;
use crate::engine::region::{Region, check_range};
use crate::engine::same_host::device_copy::DevicePath;
use crate::error::{Error, Result};
use crate::proto::{FifoItem, RemoteSeg};
use crate::trace::{self, clock_ns};
use crate::transport::IoSeg;

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
        // A peer process of this host with GPU memory takes the checked runs as they are: their
        // pieces go to the copy kernel in one pass, the first launched while the rest are listed.
        if self.link.locality == Locality::SameHost
            && let Some(done) = self.try_device_pieces(&checked, write, posted)
        {
            return done;
        }
        self.post_runs(pieces, &requests_of(&checked), write, posted, verb)
    }

    /// Every piece checked (inside its run's local region and inside the range its run's
    /// capability grants), in one pass over the pieces, with one region lookup and one capability
    /// parse per run.
    fn check_pieces<'a>(&self, runs: &[PieceRun], pieces: &'a [Piece], verb: &str) -> Result<Vec<CheckedPieces<'a>>> {
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
        let mut out = Vec::with_capacity(runs.len());
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
            let (first, mut bytes) = (span.start, 0u64);
            for (i, p) in pieces[span.clone()].iter().enumerate() {
                let local_ok =
                    p.local != 0 && p.len != 0 && p.local.checked_add(p.len).is_some() && in_region(&region, p);
                if !local_ok || !within(&granted, p.remote, p.len) {
                    return Err(ctx(piece_error(&region, &granted, p, first + i)));
                }
                bytes = bytes.saturating_add(p.len);
            }
            out.push(CheckedPieces {
                token: self.wire_token(cap.region, cap.token),
                region,
                remote_region: cap.region,
                remote_place: cap.place,
                granted: RemoteSeg { addr: run.remote.addr, len: run.remote.size },
                pieces: &pieces[span],
                bytes,
            });
        }
        Ok(out)
    }
}

/// The requests' runs that checked pieces form: a new request starts at a run's first piece
/// (unless the run continues the request before it: same regions and capability) and at a cut at
/// the request limits.
fn requests_of(checked: &[CheckedPieces]) -> Vec<CheckedRun> {
    let mut grouper = Grouper::default();
    let mut open: Option<RunHead> = None;
    let mut out = Vec::new();
    for run in checked {
        let key = RunKey { local_region: run.region.id, remote_region: run.remote_region, token: run.token };
        for p in run.pieces {
            if let Push::Started(finished) = grouper.push(key, p.len) {
                let started = RunHead {
                    region: run.region.clone(),
                    remote_region: run.remote_region,
                    remote_place: run.remote_place,
                    token: run.token,
                };
                if let (Some(done), Some(run)) = (open.replace(started), finished) {
                    out.push(CheckedRun { head: done, run });
                }
            }
        }
    }
    if let (Some(done), Some(run)) = (open, grouper.finish()) {
        out.push(CheckedRun { head: done, run });
    }
    out
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
