//! What the comms of one staged net share: the staging parameters, the count of copies in flight
//! that `needs_polling` reports, and the failure a comm keeps once it failed. Apart from `mod.rs` so that the comms and the net that makes them do not import each
//! other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::pool::Pool;
use crate::config::StagingConfig;
use crate::cuda::{Gpu, StagingRing};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingParams {
    /// Bytes per slot: the largest device chunk a comm can carry (the engine's chunk size).
    pub slot_size: usize,
    /// Slots per comm: device chunks in flight at once (the engine's window).
    pub slots: usize,
    /// Streams, copy pacing and tracing.
    pub tuning: StagingConfig,
}

impl StagingParams {
    pub fn from_config(config: &crate::config::Config) -> StagingParams {
        StagingParams { slot_size: config.chunk_size as usize, slots: config.window, tuning: config.staging }
    }

    /// `slots` slots of `slot_size` bytes with the default tuning.
    pub fn new(slot_size: usize, slots: usize) -> StagingParams {
        StagingParams { slot_size, slots, tuning: StagingConfig::default() }
    }

    /// Copy streams per ring, at least one.
    pub(super) fn streams(&self) -> usize {
        self.tuning.streams.max(1) as usize
    }

    pub(super) fn validate(&self) -> Result<()> {
        let max_slot = crate::config::MAX_CHUNK_SIZE as usize;
        if self.slot_size == 0 || self.slot_size > max_slot || self.slots == 0 || self.slots > crate::config::MAX_WINDOW
        {
            return Err(Error::invalid(format!(
                "staging needs 1..={} slots of 1..={max_slot} bytes, not {} of {}",
                crate::config::MAX_WINDOW,
                self.slots,
                self.slot_size
            )));
        }
        Ok(())
    }
}

/// The first error a staged comm hit past its argument checks. Such a failure leaves requests half
/// done (a copy queued, a slot taken), so the comm stays failed and every later call reports it.
#[derive(Default)]
pub(super) struct StickyFailure(Option<Error>);

impl StickyFailure {
    pub(super) fn check(&self) -> Result<()> {
        self.0.clone().map_or(Ok(()), Err)
    }

    pub(super) fn keep<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.0.get_or_insert_with(|| e.clone());
        }
        result
    }
}

/// What every staged comm of one net shares.
#[derive(Clone)]
pub(crate) struct Setup {
    /// The net's idle rings (`pool.rs`).
    pub(super) pool: Arc<Mutex<Pool<StagingRing>>>,
    pub(super) params: StagingParams,
    /// The inner comms' bound on outstanding requests, which the staged comms keep too.
    pub(super) max_requests: usize,
    /// Copies queued and not yet seen finished, over every comm of this net: nothing signals a
    /// finished copy, so the progress thread polls while any is in flight.
    pub(super) copies_in_flight: Arc<AtomicUsize>,
    /// The engine's GPU once it names one (`Net::set_gpu`): comms made from then on make their
    /// ring for it as they are made.
    pub(super) gpu: Arc<OnceLock<Arc<crate::cuda::Gpu>>>,
}

impl Setup {
    pub(super) fn new(params: StagingParams, max_requests: usize) -> Setup {
        let ring_bytes = (params.slot_size * params.slots).max(1);
        let keep = params.tuning.pool as usize / ring_bytes;
        Setup {
            pool: Arc::new(Mutex::new(Pool::new(keep))),
            params,
            max_requests,
            copies_in_flight: Arc::default(),
            gpu: Arc::default(),
        }
    }

    /// A ring of this net's slots for `gpu`, its segment kernel readied where it is built, its
    /// slots being locked in the background from the last down while its first copies lock theirs.
    pub(super) fn make_ring(&self, gpu: &Arc<Gpu>) -> Result<StagingRing> {
        let params = self.params;
        let mut ring = StagingRing::new(gpu, params.slot_size, params.slots, params.streams())?;
        ring.set_gather(params.tuning.gather);
        ring.prepare_kernels();
        ring.lock_ahead();
        Ok(ring)
    }

    /// A copy was queued (`+1`) or seen finished or abandoned (`-n`).
    pub(super) fn copies_changed(&self, queued: bool, n: usize) {
        if n > 0 {
            if queued {
                self.copies_in_flight.fetch_add(n, Ordering::Relaxed);
            } else {
                self.copies_in_flight.fetch_sub(n, Ordering::Relaxed);
            }
        }
    }
}
