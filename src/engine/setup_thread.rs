//! The engine's thread that sets up the new channels of connections opening parked ones
//! (`conn/life.rs`): each setup is polled a round at a time (`establish::Establishing`), all of an
//! engine's on one thread, which ends when none is left. A connection's own threads never wait
//! for a setup: TCPX's connect and accept take about 0.8 s.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::channel::Channel;
use super::establish::{Establishing, Step};
use crate::error::{Error, Result};
use crate::threads::{ThreadKind, spawn_contained};

/// Where a finished setup goes: the connection that asked for it.
pub(crate) trait SetupOwner: Send + Sync {
    /// Whether the connection still waits for channels (false once it failed or closed).
    fn wants_channels(&self) -> bool;

    /// The channels of lifetime `epoch`, or why they could not be made.
    fn channels_made(&self, epoch: u64, made: Result<Vec<Channel>>);
}

/// A setup under way, and what its channels are made with once it is done.
pub(crate) struct Setup {
    pub owner: Weak<dyn SetupOwner>,
    pub epoch: u64,
    pub setup: Establishing,
    pub deadline: Instant,
    /// Turns the finished setup's comms into channels.
    pub finish: Box<dyn FnOnce(Establishing) -> Result<Vec<Channel>> + Send>,
}

#[derive(Default)]
struct Pending {
    setups: Vec<Setup>,
    /// Whose setups the thread holds in a round, so that its death fails them too.
    stepping: Vec<(Weak<dyn SetupOwner>, u64)>,
    running: bool,
}

/// The setups of one engine, and whether its thread runs.
#[derive(Default)]
pub(crate) struct SetupThread {
    pending: Mutex<Pending>,
}

/// How long the thread sleeps after a round in which no setup moved.
const POLL: Duration = Duration::from_micros(200);

impl SetupThread {
    /// Takes `setup` on, starting the thread if none runs.
    pub fn start(self: &Arc<Self>, setup: Setup) -> Result<()> {
        let mut pending = self.pending.lock();
        pending.setups.push(setup);
        if pending.running {
            return Ok(());
        }
        let me = self.clone();
        let on_panic = {
            let me = self.clone();
            move |err: Error| me.fail_all(&err)
        };
        let builder = std::thread::Builder::new().name("uccl-tcpx-setup".into());
        spawn_contained(builder, ThreadKind::Handshake, on_panic, move || me.run())
            .map_err(|e| Error::io("spawn the channel setup thread", e))?;
        pending.running = true;
        Ok(())
    }

    fn run(&self) {
        loop {
            let mut setups = {
                let mut pending = self.pending.lock();
                let setups = std::mem::take(&mut pending.setups);
                pending.stepping = setups.iter().map(|s| (s.owner.clone(), s.epoch)).collect();
                setups
            };
            let mut moved = false;
            let mut i = 0;
            while i < setups.len() {
                let s = &mut setups[i];
                let Some(owner) = s.owner.upgrade().filter(|o| o.wants_channels()) else {
                    // Failed or closed: its comms go with it.
                    setups.swap_remove(i);
                    continue;
                };
                let outcome = match s.setup.step() {
                    Ok(Step::Done) => Some(Ok(())),
                    Ok(Step::Moved) => {
                        moved = true;
                        None
                    }
                    Ok(Step::Waiting) if Instant::now() >= s.deadline => Some(Err(s.setup.timed_out())),
                    Ok(Step::Waiting) => None,
                    Err(e) => Some(Err(e)),
                };
                match outcome {
                    None => i += 1,
                    Some(result) => {
                        let s = setups.swap_remove(i);
                        let made = result.and_then(|()| (s.finish)(s.setup));
                        owner.channels_made(s.epoch, made);
                        moved = true;
                    }
                }
            }
            {
                let mut pending = self.pending.lock();
                pending.stepping.clear();
                pending.setups.append(&mut setups);
                if pending.setups.is_empty() {
                    pending.running = false;
                    return;
                }
            }
            if !moved {
                std::thread::sleep(POLL);
            }
        }
    }

    /// The thread died: every connection it set channels up for fails.
    fn fail_all(&self, err: &Error) {
        let owners: Vec<_> = {
            let mut pending = self.pending.lock();
            pending.running = false;
            let setups = std::mem::take(&mut pending.setups);
            let mut owners = std::mem::take(&mut pending.stepping);
            owners.extend(setups.into_iter().map(|s| (s.owner, s.epoch)));
            owners
        };
        for (owner, epoch) in owners {
            if let Some(owner) = owner.upgrade() {
                owner.channels_made(epoch, Err(err.clone()));
            }
        }
    }
}
