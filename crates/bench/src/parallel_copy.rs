//! The `--same-host` anchor of what this host's memory can copy on as many threads as the library
//! copies on (`Config::host_copy_threads`, UCCL_TCPX_HOST_COPY_THREADS): one-thread memcpy says
//! nothing about a path that copies on many, and a path past many-thread memcpy is past what the
//! host's memory can do at all.
//!
//! One copy is split into contiguous shares, one per thread, the calling thread taking the first as
//! the library's copying thread takes pieces of its own job. The other threads are started once and
//! wait between copies, so a timed copy pays their wake-up, as the library's copies pay their
//! helpers', but never a thread's start.
//!
//! A panic while copying a share is caught on its thread and recorded, and the thread still passes
//! both barriers; the calling thread finds the record after the copy and fails the run with it.
//! Why not barriers that a panic breaks, or an abort: with every thread reaching every wait, no wait
//! needs to learn of a failure, the copier stays usable, and the normal path keeps its two plain
//! barriers (a caught panic costs nothing until one happens, the record one relaxed load per copy,
//! after its timing). The workspace's profiles unwind (`panic = "unwind"`); built to abort, a panic
//! ends the process, which does not hang either.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Shares start at multiples of a cache line from the buffer's start (on a line boundary where the
/// buffer is line-aligned), so neighbouring threads share at most one line.
const CACHE_LINE: usize = 64;

/// The copy the threads share next: addresses, not slices, as the buffers are borrowed only for
/// the length of [`ParallelCopy::gbs`].
#[derive(Clone, Copy, Default)]
struct Job {
    src: usize,
    dst: usize,
    len: usize,
    /// The threads end instead of copying.
    stop: bool,
    /// This share panics instead of copying: the failure path, which a copy never takes otherwise.
    #[cfg(test)]
    panicking_share: Option<usize>,
}

struct Shared {
    job: Mutex<Job>,
    /// Every thread passes it to start a copy, the calling one last.
    start: Barrier,
    /// Every thread passes it once its share is copied, or its copy panicked.
    done: Barrier,
    /// The first panic of a share since the last copy that reported one.
    panic: Mutex<Option<String>>,
    /// Whether `panic` holds one, so that a copy that went well takes no lock to learn so. Relaxed:
    /// set before `done` and read after it, which orders the two.
    panicked: AtomicBool,
    threads: usize,
}

impl Shared {
    /// Copies share `i` of `job`; a panic is recorded instead of unwinding past the barriers.
    fn copy_share(&self, job: &Job, i: usize) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| copy_share(job, self.threads, i))) {
            let what = format!(
                "share {i} of {} of the parallel memcpy panicked: {}",
                self.threads,
                uccl_tcpx::internal::threads::panic_text(&*panic)
            );
            self.panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(what);
            self.panicked.store(true, Ordering::Relaxed);
        }
    }

    /// After `done`: the panic of a share of the copy that just ended, if one did.
    fn take_panic(&self) -> Option<String> {
        if !self.panicked.load(Ordering::Relaxed) {
            return None;
        }
        self.panicked.store(false, Ordering::Relaxed);
        self.panic.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// `threads` threads copying one buffer into another, the calling thread one of them.
pub struct ParallelCopy {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    #[cfg(test)]
    panicking_share: Option<usize>,
}

impl ParallelCopy {
    /// Starts `threads - 1` helpers (none for 1). A helper that cannot be started fails the run: those
    /// started wait until the process ends.
    pub fn new(threads: usize) -> std::io::Result<ParallelCopy> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: Mutex::new(Job::default()),
            start: Barrier::new(threads),
            done: Barrier::new(threads),
            panic: Mutex::new(None),
            panicked: AtomicBool::new(false),
            threads,
        });
        let helpers = (1..threads)
            .map(|share| {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("par-memcpy-{share}")).spawn(move || help(&shared, share))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(ParallelCopy {
            shared,
            helpers,
            #[cfg(test)]
            panicking_share: None,
        })
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// GB/s of `iters` copies of `size` bytes from `src` to `dst`, each timed from the release of
    /// the threads to the end of the last share; one untimed copy first touches every share on the
    /// thread that copies it. Fails at the first copy in which a share panicked.
    pub fn gbs(&mut self, src: &[u8], dst: &mut [u8], size: usize, iters: usize) -> std::io::Result<f64> {
        let (src, dst) = (&src[..size], &mut dst[..size]);
        *self.shared.job.lock().expect("no thread panics holding the job") = Job {
            src: src.as_ptr() as usize,
            dst: dst.as_mut_ptr() as usize,
            len: size,
            stop: false,
            #[cfg(test)]
            panicking_share: self.panicking_share,
        };
        self.copy_once()?;
        let timed: Duration = (0..iters).map(|_| self.copy_once()).sum::<std::io::Result<_>>()?;
        Ok(size as f64 * iters as f64 / timed.as_secs_f64().max(1e-12) / 1e9)
    }

    /// One copy of the current job on every thread; the buffers are not touched once it returns.
    fn copy_once(&mut self) -> std::io::Result<Duration> {
        let job = *self.shared.job.lock().expect("no thread panics holding the job");
        let started = Instant::now();
        self.shared.start.wait();
        self.shared.copy_share(&job, 0);
        self.shared.done.wait();
        let took = started.elapsed();
        match self.shared.take_panic() {
            Some(what) => Err(std::io::Error::other(what)),
            None => Ok(took),
        }
    }
}

impl Drop for ParallelCopy {
    fn drop(&mut self) {
        self.shared.job.lock().expect("no thread panics holding the job").stop = true;
        self.shared.start.wait();
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

fn help(shared: &Shared, share: usize) {
    loop {
        shared.start.wait();
        let job = *shared.job.lock().expect("no thread panics holding the job");
        if job.stop {
            return;
        }
        shared.copy_share(&job, share);
        shared.done.wait();
    }
}

/// Share `i` of `threads` of a `len`-byte copy: contiguous, each but the last starting on a cache
/// line, together covering `0..len` once.
fn share(len: usize, threads: usize, i: usize) -> Range<usize> {
    let cut = |k: usize| if k >= threads { len } else { (len * k / threads) & !(CACHE_LINE - 1) };
    cut(i)..cut(i + 1)
}

fn copy_share(job: &Job, threads: usize, i: usize) {
    #[cfg(test)]
    if job.panicking_share == Some(i) {
        panic!("share {i} was set to panic");
    }
    let r = share(job.len, threads, i);
    // SAFETY: `gbs` holds `src` and `dst` (`len` bytes each, not overlapping: one is borrowed
    // mutably) from setting the job until every thread passed `done`, and the shares are disjoint,
    // so this thread alone touches this range of `dst` while the copy runs.
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts((job.src as *const u8).add(r.start), r.len()),
            std::slice::from_raw_parts_mut((job.dst as *mut u8).add(r.start), r.len()),
        )
    };
    dst.copy_from_slice(std::hint::black_box(src));
    std::hint::black_box(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_copy_once_in_order() {
        for (len, threads) in [(0, 3), (100, 4), (1 << 20, 3), ((1 << 20) + 37, 7), (4096, 1), (640, 24)] {
            let shares: Vec<Range<usize>> = (0..threads).map(|i| share(len, threads, i)).collect();
            assert_eq!(shares[0].start, 0);
            assert_eq!(shares[threads - 1].end, len);
            for pair in shares.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "{len} over {threads}: {shares:?}");
                assert!(pair[0].start <= pair[0].end, "{len} over {threads}: {shares:?}");
                assert_eq!(pair[1].start % CACHE_LINE, 0, "{len} over {threads}: {shares:?}");
            }
        }
    }

    #[test]
    fn every_byte_of_the_size_is_copied_by_the_threads() {
        let len = (4 << 20) + 4099;
        // A pattern with no period a share boundary could line up with.
        let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut copier = ParallelCopy::new(5).unwrap();
        assert_eq!(copier.threads(), 5);
        for size in [len - 3, 1000, 3] {
            let mut dst = vec![0u8; len];
            let gbs = copier.gbs(&src, &mut dst, size, 4).unwrap();
            assert!(gbs > 0.0 && gbs.is_finite(), "{gbs}");
            let wrong = (0..size).find(|&i| dst[i] != src[i]);
            assert_eq!(wrong, None, "{size} bytes copied by 5 threads");
            assert!(dst[size..].iter().all(|&b| b == 0), "only the measured size is copied");
        }
        let mut one = ParallelCopy::new(1).unwrap();
        let mut dst = vec![0u8; len];
        one.gbs(&src, &mut dst, len, 1).unwrap();
        assert!(dst == src, "one thread copies the whole size");
    }

    /// A share that panics, the calling thread's or a helper's, fails the copy with its panic
    /// instead of leaving the other threads at a barrier; the threads then copy again and end.
    #[test]
    fn a_panicking_share_fails_the_copy_instead_of_hanging() {
        let len = 1 << 20;
        let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        for panicking in [0, 2] {
            let (ended, outcome) = std::sync::mpsc::channel();
            let src = src.clone();
            // On a thread of its own, so that a hang fails the test at the timeout below.
            std::thread::spawn(move || {
                let mut copier = ParallelCopy::new(4).unwrap();
                copier.panicking_share = Some(panicking);
                let mut dst = vec![0u8; len];
                let failed = copier.gbs(&src, &mut dst, len, 3);
                copier.panicking_share = None;
                let again = copier.gbs(&src, &mut dst, len, 2).map(|_| dst == src);
                drop(copier);
                let _ = ended.send((failed, again));
            });
            let (failed, again) =
                outcome.recv_timeout(Duration::from_secs(30)).expect("the copies and the threads ended");
            let err = failed.expect_err("a share panicked");
            assert!(err.to_string().contains(&format!("share {panicking} of 4")), "{err}");
            assert!(err.to_string().contains("was set to panic"), "{err}");
            assert!(again.expect("no share panicked the second time"), "the next copy copied everything");
        }
    }
}
