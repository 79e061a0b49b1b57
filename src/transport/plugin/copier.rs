//! A GPU's copier threads: they copy landed receives out of their pinned landing slots into the
//! caller's host memory, so the progress thread never spends a copy's time.
//!
//! A copy is cut into pieces of at most [`PIECE`] bytes that the threads take in parallel: one
//! thread copies a 4 MiB receive in about as long as the next 4 MiB take to arrive over the fake
//! NIC, and a GPU NIC delivers several times what one thread copies. What a copy holds (its landing
//! slot) is let go by the thread that finished its last piece, before the copy reads as finished,
//! so the slot is free for the next receive at once instead of when the progress thread next looks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::threads::{ThreadKind, spawn_contained};

/// The most one copier thread copies of a copy at a time.
pub const PIECE: usize = 1 << 20;

/// Copier threads per GPU: a quarter of the CPUs this process may use, 1 to 4 (the rest serve the
/// plugin's sockets, the progress thread and the caller).
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (cpus / 4).clamp(1, 4)
}

/// One copy's progress.
struct CopyState {
    /// Pieces not yet copied.
    left: AtomicUsize,
    done: AtomicBool,
    /// Dropped once the last piece landed, before `done` is set.
    hold: Mutex<Option<Box<dyn Send>>>,
}

impl CopyState {
    fn piece_done(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            drop(self.hold.lock().take());
            self.done.store(true, Ordering::Release);
        }
    }
}

struct Piece {
    src: *const u8,
    dst: *mut u8,
    len: usize,
    copy: Arc<CopyState>,
}

// SAFETY: the addresses are handed to one copier thread, which alone touches those bytes until the
// piece is done; `Copier::submit`'s caller keeps both ranges valid that long.
unsafe impl Send for Piece {}

impl Piece {
    fn run(self) {
        if self.len > 0 {
            // SAFETY: per `Copier::submit`'s contract.
            unsafe { std::ptr::copy_nonoverlapping(self.src, self.dst, self.len) };
        }
        self.copy.piece_done();
    }
}

/// What the threads and the copies' owners share.
struct Health {
    /// False once a copier thread died: its piece never lands, and the others stop copying.
    alive: AtomicBool,
    /// Pieces some thread is copying right now.
    copying: AtomicUsize,
}

/// A copy handed to the copier threads.
pub struct CopyOut {
    copy: Arc<CopyState>,
    health: Arc<Health>,
}

impl CopyOut {
    /// Whether the bytes are in place; an error once a copier thread died with the copy unfinished.
    pub fn finished(&self) -> Result<bool> {
        if self.copy.done.load(Ordering::Acquire) {
            return Ok(true);
        }
        if !self.health.alive.load(Ordering::SeqCst) {
            return Err(Error::internal("a landing copier thread stopped before copying a receive out"));
        }
        Ok(false)
    }

    /// Waits until no copier thread touches the destination any more: the copy finished, or a
    /// thread died and the others stopped copying.
    pub fn wait(&self) {
        loop {
            if self.copy.done.load(Ordering::Acquire) {
                return;
            }
            // A thread counts itself copying before it checks `alive` (both sequentially
            // consistent): once `alive` reads false and nobody is copying, nobody starts again.
            if !self.health.alive.load(Ordering::SeqCst) && self.health.copying.load(Ordering::SeqCst) == 0 {
                return;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// A GPU's copier threads and the queue feeding them.
pub struct Copier {
    pieces: Option<mpsc::Sender<Piece>>,
    health: Arc<Health>,
    threads: Vec<JoinHandle<()>>,
}

impl Copier {
    pub fn start(name: &str, threads: usize) -> Result<Copier> {
        let (tx, rx) = mpsc::channel::<Piece>();
        let rx = Arc::new(Mutex::new(rx));
        let health = Arc::new(Health { alive: AtomicBool::new(true), copying: AtomicUsize::new(0) });
        let mut copier = Copier { pieces: Some(tx), health: health.clone(), threads: Vec::new() };
        for k in 0..threads.max(1) {
            let (rx, health, dies) = (rx.clone(), health.clone(), health.clone());
            let builder = std::thread::Builder::new().name(format!("{name}.{k}"));
            let thread = spawn_contained(
                builder,
                ThreadKind::LandingCopier,
                move |_| dies.alive.store(false, Ordering::SeqCst),
                move || {
                    loop {
                        // The lock is held while waiting: the threads take pieces one at a time.
                        let next = rx.lock().recv();
                        let Ok(piece) = next else { break };
                        crate::threads::point(ThreadKind::LandingCopier);
                        health.copying.fetch_add(1, Ordering::SeqCst);
                        if health.alive.load(Ordering::SeqCst) {
                            piece.run();
                        }
                        health.copying.fetch_sub(1, Ordering::SeqCst);
                    }
                },
            )
            .map_err(|e| Error::io("spawn a landing copier thread", e))?;
            copier.threads.push(thread);
        }
        Ok(copier)
    }

    /// Copies `len` bytes from `src` to `dst` in pieces on the copier threads, and drops `hold`
    /// once they all landed. With a copier thread dead, copies on the calling thread.
    ///
    /// # Safety
    /// `[src, src + len)` is readable and `[dst, dst + len)` writable, the two do not overlap, and
    /// nobody else writes either until the copy finished (or `CopyOut::wait` returned).
    pub unsafe fn submit(&self, src: *const u8, dst: *mut u8, len: usize, hold: Box<dyn Send>) -> CopyOut {
        // SAFETY: forwarded.
        unsafe { self.submit_list(&[(src, dst, len)], hold) }
    }

    /// [`submit`](Self::submit) of several copies `(src, dst, len)` as one: `hold` goes once all
    /// of them landed (a vectored receive's bytes, copied out of one slot into its pieces).
    ///
    /// # Safety
    /// As `submit`, for every copy; no two destinations overlap.
    pub unsafe fn submit_list(&self, copies: &[(*const u8, *mut u8, usize)], hold: Box<dyn Send>) -> CopyOut {
        let pieces = copies.iter().map(|c| c.2.div_ceil(PIECE)).sum::<usize>().max(1);
        let copy = Arc::new(CopyState {
            left: AtomicUsize::new(pieces),
            done: AtomicBool::new(false),
            hold: Mutex::new(Some(hold)),
        });
        let out = CopyOut { copy: copy.clone(), health: self.health.clone() };
        let inline = !self.health.alive.load(Ordering::SeqCst);
        let mut queued = 0;
        for &(src, dst, len) in copies {
            for k in 0..len.div_ceil(PIECE) {
                let at = k * PIECE;
                // SAFETY: `at` < `len`, inside both ranges.
                let (src, dst) = unsafe { (src.add(at), dst.add(at)) };
                self.queue(Piece { src, dst, len: PIECE.min(len - at), copy: copy.clone() }, inline);
                queued += 1;
            }
        }
        if queued == 0 {
            // Nothing to copy: the one piece counted for it lands at once.
            self.queue(Piece { src: std::ptr::null(), dst: std::ptr::null_mut(), len: 0, copy }, true);
        }
        out
    }

    fn queue(&self, piece: Piece, inline: bool) {
        let sent = match &self.pieces {
            Some(pieces) if !inline => pieces.send(piece),
            _ => Err(mpsc::SendError(piece)),
        };
        if let Err(mpsc::SendError(piece)) = sent {
            piece.run();
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // Closing the queue ends the threads once they copied what was queued.
        self.pieces.take();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A copier thread that let go of the last slot may be the one dropping its copier.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts drops, to see when a copy let go of what it held.
    struct Held(Arc<AtomicUsize>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// One test, so that the injected panic (process-wide) cannot reach another test's copier.
    #[test]
    fn copies_land_whole_in_pieces_and_a_dead_thread_fails_only_what_it_held() {
        let copier = Copier::start("test-copier", 3).unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        let lens = [0usize, 1, PIECE - 1, PIECE, PIECE + 1, 4 * PIECE + 4097];
        let srcs: Vec<Vec<u8>> = lens.iter().map(|&n| (0..n).map(|i| (i * 13 + n) as u8).collect()).collect();
        let mut dsts: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        let outs: Vec<CopyOut> = srcs
            .iter()
            .zip(dsts.iter_mut())
            // SAFETY: both vectors live until every copy finished (waited below); distinct buffers.
            .map(|(s, d)| unsafe {
                copier.submit(s.as_ptr(), d.as_mut_ptr(), s.len(), Box::new(Held(dropped.clone())))
            })
            .collect();
        for out in &outs {
            out.wait();
            assert!(out.finished().unwrap());
        }
        assert_eq!(dropped.load(Ordering::SeqCst), lens.len(), "every copy let go of what it held");
        assert_eq!(dsts, srcs);

        drop(copier);
        // A thread that dies takes its piece with it: that copy fails, and so does every copy
        // still unfinished; later copies run on the caller's thread.
        let copier = Copier::start("test-copier-dies", 1).unwrap();
        crate::threads::inject_panic(ThreadKind::LandingCopier);
        let src = vec![7u8; 3 * PIECE];
        let mut lost = vec![0u8; 3 * PIECE];
        // SAFETY: both live until the copy is waited for below.
        let out = unsafe { copier.submit(src.as_ptr(), lost.as_mut_ptr(), src.len(), Box::new(())) };
        out.wait();
        let err = out.finished().unwrap_err();
        assert!(err.message().contains("copier thread stopped"), "{err}");
        let mut dst = vec![0u8; 3 * PIECE];
        // SAFETY: as above.
        let out = unsafe { copier.submit(src.as_ptr(), dst.as_mut_ptr(), src.len(), Box::new(())) };
        assert!(out.finished().unwrap(), "copied on the calling thread");
        assert_eq!(dst, src);
    }

    #[test]
    fn a_list_of_copies_lands_whole_and_lets_go_once() {
        let copier = Copier::start("test-copier-list", 2).unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        // One slot's bytes copied out into pieces of every size, in another order than they lie.
        let src: Vec<u8> = (0..3 * PIECE + 999).map(|i| (i * 7) as u8).collect();
        let cuts = [(0usize, 1usize), (1, PIECE + 3), (PIECE + 4, 0), (PIECE + 4, 2 * PIECE + 995)];
        let mut dst = vec![0u8; src.len() + 64];
        let copies: Vec<(*const u8, *mut u8, usize)> = cuts
            .iter()
            .rev()
            .scan(0usize, |at, &(from, len)| {
                let to = *at;
                *at += len + 16;
                // SAFETY: every range lies inside src or dst.
                Some(unsafe { (src.as_ptr().add(from), dst.as_mut_ptr().add(to), len) })
            })
            .collect();
        // SAFETY: both buffers live until the copy is waited for below; the destinations are apart.
        let out = unsafe { copier.submit_list(&copies, Box::new(Held(dropped.clone()))) };
        out.wait();
        assert!(out.finished().unwrap());
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "what the list held went once");
        let mut at = 0;
        for &(from, len) in cuts.iter().rev() {
            assert_eq!(&dst[at..at + len], &src[from..from + len]);
            at += len + 16;
        }
        // SAFETY: an empty list touches nothing.
        let out = unsafe { copier.submit_list(&[], Box::new(Held(dropped.clone()))) };
        out.wait();
        assert!(out.finished().unwrap() && dropped.load(Ordering::SeqCst) == 2, "an empty list finishes at once");
    }
}
