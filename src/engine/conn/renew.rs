//! A connection closing its idle channels and opening new ones, as `life.rs` decides: the
//! progress thread asks a connector whose channels moved nothing for its idle time
//! (`Renewal::idle_close`, lengthened by `life::IdleTime` where work came back soon); what
//! the state asks of channels that are not open waits in `Inner::deferred` (never posted) and
//! makes this end want new ones; the engine's setup thread (`setup_thread.rs`) connects and
//! accepts them, and they take what waited. While channels are closed a deregistration's fence
//! redirects what waits for them, as it does what is queued on them.

use std::time::Instant;

use parking_lot::MutexGuard;

use super::landing::LANDING_IDLE;
use super::life::LifeAction;
use super::{Connection, Held, Inner};
use crate::engine::channel::Channel;
use crate::engine::dial;
use crate::engine::establish::{Establishing, Listens};
use crate::engine::setup_thread::{Setup, SetupOwner};
use crate::error::{Error, Result};
use crate::proto::Control;

impl Connection {
    /// The progress thread's idle pass over this connection, under one hold of its lock: landing
    /// memory that idled goes (`give_back_landing_if_idle`), and a connector whose channels idled
    /// asks the peer to close them (`close_channels_if_idle`). Returns when to look again.
    pub(crate) fn idle_pass(&self, now: Instant) -> Option<Instant> {
        let mut inner = self.inner.lock();
        let landing = self.give_back_landing_if_idle(&mut inner, now);
        let channels = self.close_channels_if_idle(&mut inner, now);
        landing.into_iter().chain(channels).min()
    }

    /// `idle_pass`'s channel part alone.
    #[cfg(test)]
    pub(crate) fn close_if_idle(&self, now: Instant) -> Option<Instant> {
        self.close_channels_if_idle(&mut self.inner.lock(), now)
    }

    /// `idle_pass`'s landing part alone.
    #[cfg(test)]
    pub(crate) fn give_back_idle_landing(&self, now: Instant) -> Option<Instant> {
        self.give_back_landing_if_idle(&mut self.inner.lock(), now)
    }

    /// A connector whose channels moved nothing for the idle time, with nothing in flight, asks
    /// the peer to close them. Returns when to ask again.
    fn close_channels_if_idle(&self, inner: &mut Inner, now: Instant) -> Option<Instant> {
        if self.renewal.idle_close.is_zero() || !self.link.connector {
            return None;
        }
        if inner.state.failure().is_some() || !inner.life.is_open() {
            return None;
        }
        let idle = inner.idle_time.get();
        let due = inner.state.last_heard() + idle;
        if now < due {
            return Some(due);
        }
        if !self.parkable(inner) {
            return Some(now + idle);
        }
        let msg = inner.life.idle()?;
        let held = Held { msgs: vec![msg], ..Held::default() };
        if let Err(e) = self.release(inner, held) {
            self.fail(inner, e);
        }
        None
    }

    /// On any transport, landing memory that no message is in goes once the connection heard
    /// nothing from its peer for [`LANDING_IDLE`]; the channels that registered it drop their
    /// registrations at their next pass. Returns when to look again.
    fn give_back_landing_if_idle(&self, inner: &mut Inner, now: Instant) -> Option<Instant> {
        if inner.state.failure().is_some() || !inner.state.holds_landing_memory() {
            return None;
        }
        let due = inner.state.last_heard() + LANDING_IDLE;
        if now < due {
            return Some(due);
        }
        if !inner.state.give_back_landing() {
            // A message waits in it for its receive.
            return Some(now + LANDING_IDLE);
        }
        // Channels sweep registrations of regions gone when the table's removals moved.
        self.core.regions.note_removal();
        log::debug!("connection {} to {}: idle landing memory given back", self.id, self.peer.addr);
        None
    }

    /// Whether this end's channels may close: nothing on them or waiting for them, and no flow
    /// that will need them.
    fn parkable(&self, inner: &Inner) -> bool {
        self.quiet(inner) && inner.state.moves_nothing()
    }

    /// The peer's message about the channels' lifetime.
    pub(super) fn handle_life(&self, inner: &mut Inner, msg: Control, held: &mut Held) -> Result<()> {
        let quiet = matches!(msg, Control::ParkChannels { .. }) && self.parkable(inner);
        let waiting = inner.deferred.iter().any(|ops| !ops.is_empty());
        let actions = inner.life.handle(msg, quiet, waiting)?;
        self.carry_out(inner, actions, held)
    }

    /// What the state asked of the channels waits for channels that are not open: this end wants
    /// new ones.
    pub(super) fn need_channels(&self, inner: &mut Inner, held: &mut Held) -> Result<()> {
        if inner.life.is_open() || inner.deferred.iter().all(Vec::is_empty) {
            return Ok(());
        }
        let actions = inner.life.need();
        self.carry_out(inner, actions, held)
    }

    fn carry_out(&self, inner: &mut Inner, actions: Vec<LifeAction>, held: &mut Held) -> Result<()> {
        let n = self.channels.len();
        for action in actions {
            match action {
                LifeAction::Send(msg) => held.msgs.push(msg),
                LifeAction::Close => {
                    for slot in self.channels.iter() {
                        let closed = slot.lock().take();
                        if closed.as_ref().is_some_and(Channel::has_posted) {
                            return Err(Error::internal("channels closed with requests posted on them"));
                        }
                    }
                    // Nothing receives into the landing slots any more.
                    inner.state.give_back_landing();
                    if self.link.connector {
                        inner.idle_time.closed(Instant::now());
                    }
                    // What the comms freed (TCPX's buffers are the C library's heap) stays the
                    // process's unless handed back: the C library keeps freed pages for its next
                    // allocations.
                    #[cfg(target_env = "gnu")]
                    // SAFETY: no arguments but the padding to keep; it only returns free memory.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    log::debug!("connection {} to {}: idle channels closed", self.id, self.peer.addr);
                }
                LifeAction::Listen { epoch } => {
                    if self.link.connector {
                        inner.idle_time.reopened(Instant::now());
                    }
                    let (listens, handles) = Listens::for_channels(&*self.renewal.net, n)?;
                    inner.listens = Some((epoch, listens));
                    held.msgs.push(Control::OpenChannels { epoch, handles });
                }
                LifeAction::Connect { epoch, mut handles } => {
                    if handles.len() != n {
                        return Err(Error::backend(format!(
                            "protocol violation: {} handles for {n} channels",
                            handles.len()
                        )));
                    }
                    let net = &self.renewal.net;
                    dial::confine(&**net, &mut handles, self.peer.addr.ip(), &self.core.config.allow_dial)?;
                    let listens = match inner.listens.take() {
                        Some((e, listens)) if e == epoch => listens,
                        _ => return Err(Error::internal("no listens for the channels being opened")),
                    };
                    let setup = Establishing::new(net.clone(), listens, handles, n, self.renewal.nonce)?;
                    let (window, removals, ahead) =
                        (self.core.config.window, self.core.regions.removals(), self.renewal.ahead);
                    self.core.setups.start(Setup {
                        owner: self.me.clone(),
                        epoch,
                        setup,
                        deadline: Instant::now() + self.core.config.connect_timeout,
                        finish: Box::new(move |s| s.into_channels(window, &removals, ahead)),
                    })?;
                }
                LifeAction::Resume => {
                    inner.queued = true;
                    held.queued = true;
                }
            }
        }
        Ok(())
    }

    /// Times this connection's channels were closed while idle, and opened again.
    pub fn channel_renewals(&self) -> (u64, u64) {
        self.inner.lock().life.counts()
    }

    /// The channels this end holds open now.
    #[cfg(test)]
    pub(crate) fn open_channels(&self) -> usize {
        self.channels.iter().filter(|slot| slot.lock().is_some()).count()
    }

    /// Whether the connection holds landing memory for the peer's eager messages.
    #[cfg(test)]
    pub(crate) fn holds_landing_memory(&self) -> bool {
        self.inner.lock().state.holds_landing_memory()
    }

    /// How long the channels idle before the connector parks them now.
    #[cfg(test)]
    pub(crate) fn idle_time(&self) -> std::time::Duration {
        self.inner.lock().idle_time.get()
    }

    /// Where the channels' lifetime stands.
    #[cfg(test)]
    pub(crate) fn channel_life(&self) -> super::life::Life {
        self.inner.lock().life.life()
    }
}

impl SetupOwner for Connection {
    fn wants_channels(&self) -> bool {
        let inner = self.inner.lock();
        inner.state.failure().is_none() && inner.life.life() == super::life::Life::Opening
    }

    fn channels_made(&self, epoch: u64, made: Result<Vec<Channel>>) {
        let mut inner = self.inner.lock();
        if inner.state.failure().is_some() {
            return;
        }
        let channels = match made {
            Ok(channels) => channels,
            Err(e) => {
                let e = Error::new(e.status(), format!("opening new channels failed: {}", e.message()));
                self.fail(&mut inner, e);
                return;
            }
        };
        if !inner.life.opened(epoch) {
            return;
        }
        for (slot, ch) in self.channels.iter().zip(channels) {
            *slot.lock() = Some(ch);
        }
        log::debug!("connection {} to {}: channels open again", self.id, self.peer.addr);
        let held = Held { queued: true, ..Held::default() };
        inner.queued = true;
        if let Err(e) = self.release(&mut inner, held) {
            self.fail(&mut inner, e);
        }
        MutexGuard::unlock_fair(inner);
    }
}
