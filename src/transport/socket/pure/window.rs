//! The request window a comm shares with its helper threads: 16 slots, request `seq` in slot
//! `seq % 16`. Request descriptions and the decisions that must be atomic across threads (which piece
//! a sender cuts next, which piece a receiver admits) sit behind one short lock per piece; byte counts
//! and completion are atomics, so `test` never locks. On an acknowledged comm (`acked`) a send
//! completes when the receiver acknowledged it, not when its bytes are in the kernel, and pieces a
//! dead socket carried are cut again before anything new.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::acked::{Claims, Completions, REACH, Take};
use super::wire::PieceCut;
use crate::error::{Error, Result};
use crate::transport::{IoSeg, Wake};

/// Outstanding requests per comm, the same bound TCPX imposes.
pub(crate) const MAX_REQUESTS: usize = 16;
const _: () = assert!((MAX_REQUESTS as u64) < REACH);

const UNKNOWN: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Request {
    seq: u64,
    /// Send: the message size. Receive: the posted capacity.
    len: usize,
    /// Receive: the sender's size, once a piece told it.
    total: u64,
    /// Receive: bytes admitted so far; never exceeds `total`, so nothing lands after completion.
    admitted: u64,
    /// Receive: each landed piece is written back from the CPU's caches (`write_back.rs`).
    write_back: bool,
}

struct Book {
    posted: u64,
    reqs: [Request; MAX_REQUESTS],
    /// Receive: one bit per piece of each request, so a repeated piece is caught even when its bytes
    /// would fit (it would leave another piece's range unwritten). Kept between requests: no
    /// allocation once grown.
    seen: [Vec<u64>; MAX_REQUESTS],
    /// Each request's memory: its segments with the request offset each starts at (one segment
    /// for a contiguous request). Kept between requests like `seen`.
    mem: [Vec<(u64, IoSeg)>; MAX_REQUESTS],
    /// Send: the next piece to cut.
    cut_seq: u64,
    cut_offset: u64,
    /// An acknowledged comm's own bookkeeping.
    acked: Option<AckedBook>,
}

impl Book {
    /// Send: bytes no socket took yet, pieces to send again (of requests not acknowledged below
    /// `upto`) included.
    fn uncut(&self, upto: u64) -> u64 {
        let again: u64 =
            self.acked.as_ref().map_or(0, |a| a.resend.iter().filter(|p| p.seq >= upto).map(|p| p.len as u64).sum());
        let fresh: u64 = (self.cut_seq..self.posted)
            .map(|seq| {
                let len = self.reqs[seq as usize % MAX_REQUESTS].len as u64;
                if seq == self.cut_seq { len.saturating_sub(self.cut_offset) } else { len }
            })
            .sum();
        again + fresh
    }
}

struct AckedBook {
    /// Receive: which socket lands which piece.
    claims: Claims,
    /// Receive: requests complete, for the acknowledgements.
    completions: Completions,
    /// Send: pieces of requests not acknowledged yet whose socket died, to send again first.
    resend: VecDeque<Piece>,
    /// Send, per slot: distinct pieces of its request written in full at least once (which
    /// `Book::seen` marks). An acknowledgement of a request not written in full is a lie.
    sent: [u64; MAX_REQUESTS],
}

#[derive(Default)]
struct Progress {
    /// Bytes sent (send) or landed (receive).
    bytes: AtomicU64,
    /// `seq + 1` once the request is complete.
    done: AtomicU64,
    size: AtomicU64,
}

/// A piece a thread moves: `len` bytes at `offset` into request `seq`; where they lie in memory is
/// its [`PieceMem`].
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub seq: u64,
    pub total: u64,
    pub offset: u64,
    pub len: usize,
}

/// The memory of one piece: one range (every piece of a contiguous request, and most of a vectored
/// one), or the segments a piece of a vectored request spans, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceMem {
    One(IoSeg),
    Many(Vec<IoSeg>),
}

impl PieceMem {
    pub fn segs(&self) -> &[IoSeg] {
        match self {
            PieceMem::One(seg) => std::slice::from_ref(seg),
            PieceMem::Many(segs) => segs,
        }
    }
}

/// Where bytes `[offset, offset + len)` of a request whose memory is `mem` lie. The caller keeps
/// the range inside the request.
fn locate(mem: &[(u64, IoSeg)], offset: u64, len: usize) -> PieceMem {
    let mut i = mem.partition_point(|&(start, _)| start <= offset).saturating_sub(1);
    let (start, seg) = mem[i];
    let mut within = (offset - start) as usize;
    if within + len <= seg.len {
        return PieceMem::One(IoSeg { addr: seg.addr + within, len });
    }
    let mut segs = Vec::new();
    let mut left = len;
    while left > 0 {
        let seg = mem[i].1;
        let n = (seg.len - within).min(left);
        segs.push(IoSeg { addr: seg.addr + within, len: n });
        left -= n;
        within = 0;
        i += 1;
    }
    PieceMem::Many(segs)
}

pub enum Admission {
    /// Read the payload into the piece's memory, then write it back from the CPU's caches if the
    /// flag says so.
    Land(Piece, PieceMem, bool),
    /// The request is not posted yet: hold the header and ask again after the next post.
    NotPosted,
    /// Acknowledged comms: as `Land`, the piece taken over from the socket named, which may be
    /// writing it: wait until it no longer runs before landing.
    TakeOver(Piece, PieceMem, bool, usize),
    /// Acknowledged comms: a copy of a piece that landed already: read its payload past. With the
    /// count to acknowledge again where its request completed (its acknowledgement may be lost).
    Discard(u64, Option<u64>),
}

pub struct Window {
    book: Mutex<Book>,
    /// Mirror of `book.posted` that threads watch without the lock.
    posted: AtomicU64,
    /// Send: requeues of pieces to send again (`acked`) that added some, so far.
    raised: AtomicU64,
    progress: [Progress; MAX_REQUESTS],
    /// How both ends cut requests into pieces.
    pub cut: PieceCut,
    closing: AtomicBool,
    failed: AtomicBool,
    failure: Mutex<Option<Error>>,
    wake: Wake,
    /// Acknowledged comms: sends complete on the receiver's acknowledgement.
    acked: bool,
    /// Send: requests the receiver acknowledged, all below this.
    acked_upto: AtomicU64,
    /// Receive, per socket: another socket took over the piece it lands; it reads the rest past.
    revoked: Box<[AtomicBool]>,
    /// Send, acknowledged comms, per slot: threads inside a `sendmsg` from its request's memory.
    /// A request acknowledged meanwhile completes only once the last leaves (`pending`), so the
    /// caller never reuses memory a `sendmsg` still reads.
    writing: [AtomicU32; MAX_REQUESTS],
    pending: [AtomicBool; MAX_REQUESTS],
}

impl Window {
    /// The window of an acknowledged comm of `slots` sockets (spares included).
    pub fn acked(cut: PieceCut, wake: Wake, slots: usize) -> Window {
        let mut w = Window::new(cut, wake);
        w.acked = true;
        w.revoked = (0..slots).map(|_| AtomicBool::new(false)).collect();
        w.book.get_mut().acked = Some(AckedBook {
            claims: Claims::new(slots),
            completions: Completions::default(),
            resend: VecDeque::new(),
            sent: [0; MAX_REQUESTS],
        });
        w
    }

    pub fn new(cut: PieceCut, wake: Wake) -> Window {
        let empty = Request { seq: UNKNOWN, len: 0, total: UNKNOWN, admitted: 0, write_back: false };
        Window {
            book: Mutex::new(Book {
                posted: 0,
                reqs: [empty; MAX_REQUESTS],
                seen: Default::default(),
                mem: Default::default(),
                cut_seq: 0,
                cut_offset: 0,
                acked: None,
            }),
            posted: AtomicU64::new(0),
            raised: AtomicU64::new(0),
            progress: Default::default(),
            cut,
            closing: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            wake,
            acked: false,
            acked_upto: AtomicU64::new(0),
            revoked: Box::new([]),
            writing: Default::default(),
            pending: Default::default(),
        }
    }

    /// Wakes whoever polls the comm (a socket died: the comm's owner replaces it).
    pub fn wake(&self) {
        (self.wake)();
    }

    /// Whether the receiver acknowledges completed requests.
    pub fn is_acked(&self) -> bool {
        self.acked
    }

    /// Publishes request `seq` over the memory of `iov` (at least one segment; the caller checked
    /// the window has room, so its slot is free). Returns whether nothing older is left to cut (the
    /// request is next on the wire). The caller then kicks the helpers. A receive's pieces are written
    /// back from the CPU's caches as they land with `write_back` (a DMA engine reads them next).
    pub fn post(&self, seq: u64, iov: &[IoSeg], write_back: bool) -> bool {
        let slot = seq as usize % MAX_REQUESTS;
        self.progress[slot].bytes.store(0, Ordering::Relaxed);
        let alone = {
            let mut book = self.book.lock();
            debug_assert_eq!(book.posted, seq);
            let mem = &mut book.mem[slot];
            mem.clear();
            let mut len = 0;
            for seg in iov.iter().filter(|s| s.len > 0 || iov.len() == 1) {
                mem.push((len as u64, *seg));
                len += seg.len;
            }
            if mem.is_empty() {
                // Empty segments only: an empty message, which still needs somewhere to point.
                mem.push((0, iov[0]));
            }
            let pieces = self.cut.pieces(len as u64);
            let Book { seen, acked, .. } = &mut *book;
            if let Some(acked) = acked {
                // Send: no piece written yet (a receive resets `seen` at its first piece).
                acked.sent[slot] = 0;
                seen[slot].clear();
                seen[slot].resize(pieces.div_ceil(64) as usize, 0);
            }
            book.reqs[slot] = Request { seq, len, total: UNKNOWN, admitted: 0, write_back };
            book.posted = seq + 1;
            book.cut_seq == seq
        };
        self.posted.store(seq + 1, Ordering::SeqCst);
        alone
    }

    /// Requests posted so far. SeqCst: a helper that stops looking for work checks it after
    /// saying so, and a poster checks what the helper said after publishing (neither misses both).
    pub fn posted(&self) -> u64 {
        self.posted.load(Ordering::SeqCst)
    }

    /// Sender: what a socket that found nothing to cut compares before and after it said it is
    /// free: posts and requeues of pieces to send again so far (each only grows, so the sum
    /// changes with either). SeqCst, as `posted`: a requeuer bumps it and then looks at the sockets.
    pub fn send_work(&self) -> u64 {
        self.posted.load(Ordering::SeqCst) + self.raised.load(Ordering::SeqCst)
    }

    /// Sender: the next piece to put on a free socket, if any request still has uncut bytes. Pieces
    /// are cut in request order, so the oldest request finishes first.
    pub fn cut(&self) -> Option<(Piece, PieceMem)> {
        self.cut_unless(|_, _| false)
    }

    /// As [`cut`](Self::cut), but the piece stays for another socket where `declines(len,
    /// uncut)` says so; `uncut()` counts the bytes no socket took yet, this piece's included.
    pub fn cut_unless(&self, declines: impl FnOnce(u64, &dyn Fn() -> u64) -> bool) -> Option<(Piece, PieceMem)> {
        let mut book = self.book.lock();
        let book = &mut *book;
        let upto = self.acked_upto.load(Ordering::Acquire);
        if let Some(acked) = &mut book.acked {
            // Acknowledged already: nobody sends them again.
            while acked.resend.front().is_some_and(|p| p.seq < upto) {
                acked.resend.pop_front();
            }
            if let Some(&p) = acked.resend.front() {
                if declines(p.len as u64, &|| book.uncut(upto)) {
                    return None;
                }
                // Not acknowledged: its request still holds its slot and memory.
                let acked = book.acked.as_mut().expect("an acknowledged comm");
                acked.resend.pop_front();
                let mem = locate(&book.mem[p.seq as usize % MAX_REQUESTS], p.offset, p.len);
                return Some((p, mem));
            }
        }
        if book.cut_seq >= book.posted {
            return None;
        }
        let slot = book.cut_seq as usize % MAX_REQUESTS;
        let req = book.reqs[slot];
        let offset = book.cut_offset;
        let piece = self.cut.piece_len(req.len as u64);
        // Holds while no request is completed before it was cut to its end (`ack`): the slot is
        // never reused under the cut.
        let Some(rest) = (req.len as u64).checked_sub(offset).filter(|_| req.seq == book.cut_seq) else {
            self.fail(Error::backend(format!("request {} was cut past its end", book.cut_seq)));
            return None;
        };
        let len = rest.min(piece) as usize;
        if declines(len as u64, &|| book.uncut(upto)) {
            return None;
        }
        book.cut_offset += piece;
        if book.cut_offset >= req.len as u64 {
            book.cut_seq += 1;
            book.cut_offset = 0;
        }
        let mem = locate(&book.mem[slot], offset, len);
        Some((Piece { seq: req.seq, total: req.len as u64, offset, len }, mem))
    }

    /// Receiver: a piece header's message size for request `seq`: it must fit the posted
    /// receive and, once the first piece sized the request, agree with it. Returns the piece length
    /// the size is cut by.
    fn size(&self, req: &mut Request, seen: &mut Vec<u64>, seq: u64, total: u64) -> Result<u64> {
        if total > req.len as u64 {
            return Err(Error::backend(format!("peer sent a {total}-byte message into a {}-byte receive", req.len)));
        }
        let piece = self.cut.piece_len(total);
        if req.total == UNKNOWN {
            req.total = total;
            seen.clear();
            seen.resize(total.div_ceil(piece).div_ceil(64).max(1) as usize, 0);
        } else if req.total != total {
            return Err(Error::backend(format!(
                "protocol violation: pieces of request {seq} disagree on its size ({} and {total} bytes)",
                req.total
            )));
        }
        Ok(piece)
    }

    /// Receiver: checks a piece header against the posted requests and reserves its bytes. Errors are
    /// protocol violations (the comm fails): the peer can never make us write outside a posted buffer
    /// or into a request that already completed.
    pub fn admit(&self, seq: u64, total: u64, offset: u64, len: u64) -> Result<Admission> {
        let mut book = self.book.lock();
        if seq >= book.posted {
            return Ok(Admission::NotPosted);
        }
        let slot = seq as usize % MAX_REQUESTS;
        let Book { reqs, seen, mem, .. } = &mut *book;
        let req = &mut reqs[slot];
        let seen = &mut seen[slot];
        if req.seq != seq || self.progress[slot].done.load(Ordering::Acquire) == seq + 1 {
            return Err(Error::backend(format!(
                "protocol violation: peer sent a piece of request {seq}, which is complete"
            )));
        }
        let piece = self.size(req, seen, seq, total)?;
        // The header decoder checked that offset is a multiple of the piece size below total.
        let index = (offset / piece) as usize;
        let bit = 1u64 << (index % 64);
        if seen[index / 64] & bit != 0 || req.admitted + len > total {
            return Err(Error::backend(format!("protocol violation: request {seq} received a piece twice")));
        }
        seen[index / 64] |= bit;
        req.admitted += len;
        let piece = Piece { seq, total, offset, len: len as usize };
        // Inside the posted memory: offset + len <= total <= the posted capacity.
        let piece_mem = locate(&mem[slot], offset, len as usize);
        if total == 0 {
            // Completing under the lock makes a repeated empty piece see `done` and fail.
            self.complete(slot, seq, 0);
        }
        Ok(Admission::Land(piece, piece_mem, req.write_back))
    }

    /// Counts a moved piece; the thread that moves a request's last byte completes it.
    pub fn finish(&self, piece: &Piece) {
        if self.acked {
            // Sent, and complete only once acknowledged (`ack`).
            let slot = piece.seq as usize % MAX_REQUESTS;
            self.progress[slot].bytes.fetch_add(piece.len as u64, Ordering::AcqRel);
            return;
        }
        if piece.len == 0 {
            if piece.total == 0
                && self.progress[piece.seq as usize % MAX_REQUESTS].done.load(Ordering::Acquire) <= piece.seq
            {
                self.complete(piece.seq as usize % MAX_REQUESTS, piece.seq, 0);
            }
            return;
        }
        let slot = piece.seq as usize % MAX_REQUESTS;
        let before = self.progress[slot].bytes.fetch_add(piece.len as u64, Ordering::AcqRel);
        if before + piece.len as u64 == piece.total {
            self.complete(slot, piece.seq, piece.total);
        }
    }

    /// Sender: the receiver completed every request below `completed`; completes those not
    /// acknowledged yet, each once no `sendmsg` reads its memory. Returns whether that moved. An
    /// acknowledgement of a request not written in full (every piece, at least once) is a
    /// protocol violation: the peer cannot hold its bytes, and completing it would let the caller
    /// reuse memory the sockets still send from.
    pub fn ack(&self, completed: u64) -> Result<bool> {
        let book = self.book.lock();
        let upto = self.acked_upto.load(Ordering::Acquire);
        if completed <= upto {
            return Ok(false);
        }
        let lie = |seq: u64| {
            Error::backend(format!(
                "protocol violation: the receiver acknowledged {completed} requests, request {seq} was not sent in full"
            ))
        };
        if completed > book.cut_seq {
            return Err(lie(book.cut_seq));
        }
        // A request whose last piece a `sendmsg` is writing now may be acknowledged already (its
        // bytes left before the writer marked them): it is checked once the writer left.
        if let Some(seq) = (upto..completed).find(|&seq| {
            self.writing[seq as usize % MAX_REQUESTS].load(Ordering::SeqCst) == 0 && !self.all_sent(&book, seq)
        }) {
            return Err(lie(seq));
        }
        // SeqCst with `begin_write`: a writer entering from now on sees the request acknowledged
        // and sends no more of its memory, or this sees the writer and leaves completion to it.
        self.acked_upto.store(completed, Ordering::SeqCst);
        for seq in upto..completed {
            let slot = seq as usize % MAX_REQUESTS;
            self.pending[slot].store(true, Ordering::SeqCst);
            if self.writing[slot].load(Ordering::SeqCst) > 0 {
                continue;
            }
            self.pending[slot].store(false, Ordering::SeqCst);
            if !self.all_sent(&book, seq) {
                return Err(lie(seq));
            }
            self.complete(slot, seq, book.reqs[slot].len as u64);
        }
        Ok(true)
    }

    /// Sender of an acknowledged comm: a thread is about to write bytes of `piece` from its
    /// request's memory. False when the request was acknowledged already: the memory may be the
    /// caller's again, and the rest of the piece must come from elsewhere. Pair with
    /// [`end_write`](Self::end_write) when true.
    pub fn begin_write(&self, piece: &Piece) -> bool {
        let slot = piece.seq as usize % MAX_REQUESTS;
        self.writing[slot].fetch_add(1, Ordering::SeqCst);
        if piece.seq >= self.acked_upto.load(Ordering::SeqCst) {
            return true;
        }
        self.leave(slot);
        false
    }

    /// Sender of an acknowledged comm: the write [`begin_write`](Self::begin_write) allowed is
    /// over; `whole`: the piece is written to its end.
    pub fn end_write(&self, piece: &Piece, whole: bool) {
        let slot = piece.seq as usize % MAX_REQUESTS;
        if whole {
            let mut book = self.book.lock();
            let Book { reqs, seen, acked, .. } = &mut *book;
            let index = piece.offset / self.cut.piece_len(piece.total);
            let (word, bit) = (index as usize / 64, 1u64 << (index % 64));
            if let Some(acked) = acked
                && reqs[slot].seq == piece.seq
                && seen[slot].get(word).is_some_and(|w| w & bit == 0)
            {
                seen[slot][word] |= bit;
                acked.sent[slot] += 1;
            }
        }
        self.leave(slot);
    }

    /// Sender of an acknowledged comm: every piece of request `seq` was written in full.
    fn all_sent(&self, book: &Book, seq: u64) -> bool {
        let slot = seq as usize % MAX_REQUESTS;
        let req = &book.reqs[slot];
        req.seq == seq && book.acked.as_ref().is_some_and(|a| a.sent[slot] == self.cut.pieces(req.len as u64))
    }

    /// A writer of `slot` left; the last completes a request acknowledged meanwhile.
    fn leave(&self, slot: usize) {
        if self.writing[slot].fetch_sub(1, Ordering::SeqCst) != 1 || !self.pending[slot].load(Ordering::SeqCst) {
            return;
        }
        let book = self.book.lock();
        // Under the lock `ack` holds: it completed the request itself, or left it to us.
        if self.writing[slot].load(Ordering::SeqCst) != 0 || !self.pending[slot].swap(false, Ordering::SeqCst) {
            return;
        }
        let seq = book.reqs[slot].seq;
        if self.all_sent(&book, seq) {
            self.complete(slot, seq, book.reqs[slot].len as u64);
        } else {
            self.fail(Error::backend(format!(
                "protocol violation: the receiver acknowledged request {seq}, which was not sent in full"
            )));
        }
    }

    /// Sender: requests acknowledged so far.
    pub fn acked_upto(&self) -> u64 {
        self.acked_upto.load(Ordering::Acquire)
    }

    /// Sender: `pieces` a dead socket carried go out again, before any new piece; those of
    /// acknowledged requests are dropped. Returns how many will, and their bytes.
    pub fn resend(&self, pieces: impl IntoIterator<Item = Piece>) -> (u64, u64) {
        let mut bytes = 0;
        let n = {
            let mut book = self.book.lock();
            let upto = self.acked_upto.load(Ordering::Acquire);
            let Some(acked) = &mut book.acked else { return (0, 0) };
            let before = acked.resend.len();
            acked.resend.extend(pieces.into_iter().filter(|p| p.seq >= upto).inspect(|p| bytes += p.len as u64));
            log::debug!(
                "resend {:?} (acknowledged below {upto})",
                acked.resend.iter().map(|p| (p.seq, p.offset)).collect::<Vec<_>>()
            );
            (acked.resend.len() - before) as u64
        };
        if n > 0 {
            // As a post: a socket that looks again finds them.
            self.raised.fetch_add(1, Ordering::SeqCst);
        }
        (n, bytes)
    }

    /// Receiver of an acknowledged comm: [`admit`](Self::admit) for socket `k`, where a piece
    /// may come twice.
    pub fn admit_acked(&self, k: usize, seq: u64, total: u64, offset: u64, len: u64) -> Result<Admission> {
        let mut book = self.book.lock();
        if seq >= book.posted {
            return Ok(Admission::NotPosted);
        }
        let slot = seq as usize % MAX_REQUESTS;
        let Book { reqs, seen, mem, acked, .. } = &mut *book;
        let acked = acked.as_mut().expect("an acknowledged comm's book");
        let req = &mut reqs[slot];
        if req.seq != seq || self.progress[slot].done.load(Ordering::Acquire) == seq + 1 {
            log::debug!("socket {k}: piece {seq}/{offset} of a completed request");
            // Its request completed (a later one may hold the slot): acknowledge again.
            return Ok(Admission::Discard(len, Some(acked.completions.upto())));
        }
        let seen = &mut seen[slot];
        let piece = self.size(req, seen, seq, total)?;
        let index = offset / piece;
        if seen[index as usize / 64] & (1u64 << (index % 64)) != 0 {
            log::debug!("socket {k}: piece {seq}/{offset} landed already");
            return Ok(Admission::Discard(len, None));
        }
        // A new piece for this socket: a takeover of its last one no longer applies.
        self.revoked[k].store(false, Ordering::Release);
        let p = Piece { seq, total, offset, len: len as usize };
        let piece_mem = locate(&mem[slot], offset, len as usize);
        Ok(match acked.claims.take(k, (seq, index)) {
            Take::Land => Admission::Land(p, piece_mem, req.write_back),
            Take::TakeOver(from) => {
                log::debug!("socket {k} takes piece {seq}/{offset} over from socket {from}");
                // Under the lock, so that `from` cannot have moved on to another piece meanwhile.
                self.revoked[from].store(true, Ordering::Release);
                Admission::TakeOver(p, piece_mem, req.write_back, from)
            }
        })
    }

    /// Receiver of an acknowledged comm: socket `k` landed `piece`. Counted only if `k` still held
    /// it; returns the new count of completed requests when this moved it.
    pub fn landed_acked(&self, k: usize, piece: &Piece) -> Option<u64> {
        let mut book = self.book.lock();
        let index = piece.offset / self.cut.piece_len(piece.total);
        let slot = piece.seq as usize % MAX_REQUESTS;
        let Book { reqs, seen, acked, .. } = &mut *book;
        let acked = acked.as_mut().expect("an acknowledged comm's book");
        if !acked.claims.finish(k, (piece.seq, index)) || reqs[slot].seq != piece.seq {
            return None;
        }
        seen[slot][index as usize / 64] |= 1u64 << (index % 64);
        let req = &mut reqs[slot];
        req.admitted += piece.len as u64;
        self.progress[slot].bytes.fetch_add(piece.len as u64, Ordering::AcqRel);
        if req.admitted < piece.total {
            return None;
        }
        self.complete(slot, piece.seq, piece.total);
        acked.completions.complete(piece.seq)
    }

    /// Receiver of an acknowledged comm: socket `k` died; a copy of its piece lands elsewhere.
    pub fn drop_socket(&self, k: usize) {
        if let Some(acked) = &mut self.book.lock().acked {
            acked.claims.drop_socket(k);
        }
    }

    /// Receiver: another socket took over the piece socket `k` lands.
    pub fn revoked(&self, k: usize) -> bool {
        self.revoked.get(k).is_some_and(|r| r.load(Ordering::Acquire))
    }

    #[cfg(test)]
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn complete(&self, slot: usize, seq: u64, size: u64) {
        self.progress[slot].size.store(size, Ordering::Relaxed);
        self.progress[slot].done.store(seq + 1, Ordering::Release);
        (self.wake)();
    }

    /// `Some(size)` once request `seq` is complete.
    pub fn done(&self, seq: u64) -> Option<usize> {
        let p = &self.progress[seq as usize % MAX_REQUESTS];
        (p.done.load(Ordering::Acquire) == seq + 1).then(|| p.size.load(Ordering::Relaxed) as usize)
    }

    pub fn fail(&self, err: Error) {
        self.failure.lock().get_or_insert(err);
        self.failed.store(true, Ordering::Release);
        self.closing.store(true, Ordering::Release);
        (self.wake)();
    }

    pub fn check(&self) -> Result<()> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.failure.lock() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}
