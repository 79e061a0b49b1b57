//! The lifetime of a connection's channels. A net plugin's comms hold buffers and helper threads
//! whether or not they move anything (TCPX: about 7 MiB and a thread a comm, docs/TCPX.md), so a
//! connection whose channels moved nothing for `UCCL_TCPX_IDLE_CLOSE_MS` closes them, keeping its
//! control stream, and opens new ones when work comes. A plain state machine: the connection
//! feeds it the peer's messages and its own needs and carries out the actions it returns.
//!
//! The connector decides both ways, so the ends never race each other. It parks only when it has
//! nothing in flight and asks the acceptor (ParkChannels); the acceptor closes its channels only
//! when it has nothing in flight either (ChannelsParked), else both keep them. Between its ask and
//! the answer the connector posts nothing on its channels: what its calls and the peer's messages
//! ask of them waits, and goes on the channels it keeps or on the next ones. Either end with work
//! for parked channels gets new ones: the connector listens and sends its handles (OpenChannels),
//! the acceptor, asked by it (WantChannels) or not, answers with its own, and both connect and
//! accept as at the handshake. `epoch` numbers the lifetimes, so that a message about an earlier
//! one is told apart.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::{Control, NET_HANDLE_SIZE};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Life {
    /// The channels take work.
    Open,
    /// The connector asked to park them: work waits for the answer.
    Parking,
    /// No channels: work waits for new ones.
    Parked,
    /// New channels are being set up.
    Opening,
}

/// What the connection does for the channels' lifetime.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LifeAction {
    Send(Control),
    /// Close every channel (nothing is posted on them).
    Close,
    /// Listen for the channels of lifetime `epoch` and send the handles in an OpenChannels.
    Listen {
        epoch: u64,
    },
    /// Connect to the peer's handles and accept on the listens made for `epoch`.
    Connect {
        epoch: u64,
        handles: Vec<[u8; NET_HANDLE_SIZE]>,
    },
    /// What waited for the channels goes to them now.
    Resume,
}

pub(super) struct ChannelLife {
    connector: bool,
    life: Life,
    epoch: u64,
    /// The acceptor asked for the parked channels (WantChannels) already.
    asked: bool,
    /// Times the channels were closed, and opened again.
    parks: u64,
    opens: u64,
}

fn violation(what: &str) -> Error {
    Error::backend(format!("protocol violation: {what}"))
}

impl ChannelLife {
    pub fn new(connector: bool) -> ChannelLife {
        ChannelLife { connector, life: Life::Open, epoch: 0, asked: false, parks: 0, opens: 0 }
    }

    pub fn life(&self) -> Life {
        self.life
    }

    /// Whether the channels take work now.
    pub fn is_open(&self) -> bool {
        self.life == Life::Open
    }

    /// Times the channels were closed while idle, and opened again.
    pub fn counts(&self) -> (u64, u64) {
        (self.parks, self.opens)
    }

    /// The connector's channels moved nothing for the idle time and nothing is in flight: it asks
    /// the acceptor to park them. None where it is not the connector's to ask or not open.
    pub fn idle(&mut self) -> Option<Control> {
        if !self.connector || self.life != Life::Open {
            return None;
        }
        self.life = Life::Parking;
        Some(Control::ParkChannels { epoch: self.epoch })
    }

    /// Work waits for channels that are not open: the connector opens new ones once parked, the
    /// acceptor asks it to (once per parking).
    pub fn need(&mut self) -> Vec<LifeAction> {
        match (self.life, self.connector) {
            (Life::Parked, true) => self.reopen(),
            (Life::Parked, false) if !self.asked => {
                self.asked = true;
                vec![LifeAction::Send(Control::WantChannels { epoch: self.epoch })]
            }
            _ => Vec::new(),
        }
    }

    fn reopen(&mut self) -> Vec<LifeAction> {
        self.epoch += 1;
        self.life = Life::Opening;
        vec![LifeAction::Listen { epoch: self.epoch }]
    }

    /// The peer's message about the channels. `quiet`: nothing of ours is in flight or waiting for
    /// the channels (asked of the acceptor when the connector wants to park); `waiting`: work
    /// waits for the channels (asked of the connector when the acceptor parked).
    pub fn handle(&mut self, msg: Control, quiet: bool, waiting: bool) -> Result<Vec<LifeAction>> {
        match msg {
            Control::ParkChannels { epoch } => {
                if self.connector || epoch != self.epoch {
                    return Err(violation("a ParkChannels the acceptor did not expect"));
                }
                // Opening: the connector's setup finished before ours; ours keeps them.
                let parked = self.life == Life::Open && quiet;
                let mut out = Vec::new();
                if parked {
                    self.life = Life::Parked;
                    self.asked = false;
                    self.parks += 1;
                    out.push(LifeAction::Close);
                } else if self.life != Life::Open && self.life != Life::Opening {
                    return Err(violation("a ParkChannels for parked channels"));
                }
                out.push(LifeAction::Send(Control::ChannelsParked { epoch, parked }));
                Ok(out)
            }
            Control::ChannelsParked { epoch, parked } => {
                if !self.connector || self.life != Life::Parking || epoch != self.epoch {
                    return Err(violation("a ChannelsParked the connector did not ask for"));
                }
                if !parked {
                    self.life = Life::Open;
                    return Ok(vec![LifeAction::Resume]);
                }
                self.life = Life::Parked;
                self.parks += 1;
                let mut out = vec![LifeAction::Close];
                if waiting {
                    out.extend(self.reopen());
                }
                Ok(out)
            }
            Control::WantChannels { epoch } => {
                if !self.connector || epoch > self.epoch {
                    return Err(violation("a WantChannels the connector cannot answer"));
                }
                // For an earlier lifetime, or asked while we open anyway: nothing more to do.
                Ok(if epoch == self.epoch && self.life == Life::Parked { self.reopen() } else { Vec::new() })
            }
            Control::OpenChannels { epoch, handles } => {
                if self.connector {
                    if self.life != Life::Opening || epoch != self.epoch {
                        return Err(violation("an OpenChannels answer the connector did not ask for"));
                    }
                    return Ok(vec![LifeAction::Connect { epoch, handles }]);
                }
                if self.life != Life::Parked || epoch != self.epoch + 1 {
                    return Err(violation("an OpenChannels for channels that are not parked"));
                }
                self.epoch = epoch;
                self.life = Life::Opening;
                Ok(vec![LifeAction::Listen { epoch }, LifeAction::Connect { epoch, handles }])
            }
            _ => Err(Error::backend("internal: not a message about the channels' lifetime")),
        }
    }

    /// This end's new channels of `epoch` are set up: they take work. False for a setup this
    /// lifetime no longer waits for (the caller closes them).
    pub fn opened(&mut self, epoch: u64) -> bool {
        if self.life != Life::Opening || epoch != self.epoch {
            return false;
        }
        self.life = Life::Open;
        self.opens += 1;
        true
    }
}

/// How long the connector's channels idle before it parks them: the setting, doubled (up to
/// [`IdleTime::MAX_FACTOR`] times it) each time the channels were wanted again within the idle
/// time after it closed them, and halved back towards the setting each time they stayed closed
/// longer than that. Work that pauses just past the setting then pays one reopening (0.8 s on
/// TCPX), not one at every pause.
#[derive(Debug)]
pub(crate) struct IdleTime {
    setting: Duration,
    now: Duration,
    closed_at: Option<Instant>,
}

impl IdleTime {
    pub const MAX_FACTOR: u32 = 16;

    pub fn new(setting: Duration) -> IdleTime {
        IdleTime { setting, now: setting, closed_at: None }
    }

    pub fn get(&self) -> Duration {
        self.now
    }

    /// The channels closed at `at`.
    pub fn closed(&mut self, at: Instant) {
        self.closed_at = Some(at);
    }

    /// New channels are being opened at `at`.
    pub fn reopened(&mut self, at: Instant) {
        let Some(closed) = self.closed_at.take() else { return };
        self.now = if at.saturating_duration_since(closed) < self.now {
            (self.now * 2).min(self.setting * Self::MAX_FACTOR)
        } else {
            (self.now / 2).max(self.setting)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reopened soon after a close, the idle time doubles up to its bound; closed longer than it,
    /// it halves back to the setting, never below.
    #[test]
    fn the_idle_time_follows_the_pauses_between_work() {
        let s = Duration::from_secs(60);
        let mut t = IdleTime::new(s);
        let start = Instant::now();
        t.reopened(start);
        assert_eq!(t.get(), s, "opened without a close first: unchanged");
        let mut at = start;
        for factor in [2, 4, 8, 16, 16] {
            t.closed(at);
            at += s / 2;
            t.reopened(at);
            assert_eq!(t.get(), s * factor, "wanted again within the idle time");
        }
        for factor in [8, 4, 2, 1, 1] {
            t.closed(at);
            at += t.get() + Duration::from_secs(1);
            t.reopened(at);
            assert_eq!(t.get(), s * factor, "closed longer than the idle time");
        }
    }

    const H: [u8; NET_HANDLE_SIZE] = [7; NET_HANDLE_SIZE];

    fn sent(actions: &[LifeAction]) -> Vec<Control> {
        actions
            .iter()
            .filter_map(|a| match a {
                LifeAction::Send(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    /// A whole lifetime between the two ends: parked when both are quiet, opened again by the
    /// connector's own work, parked again, then opened at the acceptor's asking.
    #[test]
    fn both_ends_park_and_open_their_channels_in_step() {
        let (mut c, mut a) = (ChannelLife::new(true), ChannelLife::new(false));
        assert_eq!(a.idle(), None, "the acceptor never asks");
        let park = c.idle().unwrap();
        assert_eq!(c.life(), Life::Parking);
        assert_eq!(c.idle(), None, "asked once");
        let out = a.handle(park, true, false).unwrap();
        assert_eq!(out[0], LifeAction::Close);
        assert_eq!(a.life(), Life::Parked);
        let answer = sent(&out).pop().unwrap();
        assert_eq!(c.handle(answer, false, false).unwrap(), [LifeAction::Close]);
        assert_eq!((c.life(), c.counts(), a.counts()), (Life::Parked, (1, 0), (1, 0)));

        // The connector's own work opens them again.
        assert_eq!(c.need(), [LifeAction::Listen { epoch: 1 }]);
        assert_eq!(c.need(), [], "opening already");
        let offer = Control::OpenChannels { epoch: 1, handles: vec![H] };
        let out = a.handle(offer, false, false).unwrap();
        assert_eq!(out, [LifeAction::Listen { epoch: 1 }, LifeAction::Connect { epoch: 1, handles: vec![H] }]);
        let answer = Control::OpenChannels { epoch: 1, handles: vec![H, H] };
        let out = c.handle(answer, false, false).unwrap();
        assert_eq!(out, [LifeAction::Connect { epoch: 1, handles: vec![H, H] }]);
        assert!(!c.opened(0), "an earlier lifetime's setup is not taken");
        assert!(c.opened(1) && a.opened(1));
        assert!(c.is_open() && a.is_open());

        // Parked again; this time the acceptor has work, and asks once.
        let park = c.idle().unwrap();
        assert_eq!(park, Control::ParkChannels { epoch: 1 });
        let answer = sent(&a.handle(park, true, false).unwrap()).pop().unwrap();
        c.handle(answer, false, false).unwrap();
        let want = sent(&a.need()).pop().unwrap();
        assert_eq!(want, Control::WantChannels { epoch: 1 });
        assert_eq!(a.need(), [], "asked once a parking");
        assert_eq!(c.handle(want, false, false).unwrap(), [LifeAction::Listen { epoch: 2 }]);
        assert_eq!(c.counts(), (2, 1));
    }

    /// An acceptor with work in flight keeps the channels, and the connector resumes on them.
    #[test]
    fn a_busy_acceptor_keeps_the_channels() {
        let (mut c, mut a) = (ChannelLife::new(true), ChannelLife::new(false));
        let park = c.idle().unwrap();
        let out = a.handle(park, false, false).unwrap();
        assert_eq!(out, [LifeAction::Send(Control::ChannelsParked { epoch: 0, parked: false })]);
        assert!(a.is_open());
        assert_eq!(c.handle(sent(&out).pop().unwrap(), false, true).unwrap(), [LifeAction::Resume]);
        assert!(c.is_open());
        assert_eq!((c.counts(), a.counts()), ((0, 0), (0, 0)));
    }

    /// Work that came while the connector waited for the answer opens new channels at once.
    #[test]
    fn work_waiting_when_parked_opens_new_channels_at_once() {
        let mut c = ChannelLife::new(true);
        c.idle().unwrap();
        let out = c.handle(Control::ChannelsParked { epoch: 0, parked: true }, false, true).unwrap();
        assert_eq!(out, [LifeAction::Close, LifeAction::Listen { epoch: 1 }]);
        // The acceptor's ask crossed our offer: nothing more.
        assert_eq!(c.handle(Control::WantChannels { epoch: 0 }, false, false).unwrap(), []);
    }

    /// One end of the model below: its lifetime, the messages on their way to it, whether it has
    /// work on the channels (`busy`) or waiting for them (`waiting`), and its setup under way.
    struct End {
        life: ChannelLife,
        inbox: std::collections::VecDeque<Control>,
        busy: bool,
        waiting: bool,
        setup: Option<u64>,
    }

    impl End {
        /// Carries out `actions` as the connection does; messages go to `peer`.
        fn carry_out(&mut self, actions: Vec<LifeAction>, peer: &mut std::collections::VecDeque<Control>) {
            for action in actions {
                match action {
                    LifeAction::Send(msg) => peer.push_back(msg),
                    LifeAction::Close => assert!(!self.busy, "channels closed under work"),
                    LifeAction::Listen { epoch } => peer.push_back(Control::OpenChannels { epoch, handles: vec![H] }),
                    LifeAction::Connect { epoch, .. } => self.setup = Some(epoch),
                    LifeAction::Resume => self.start_waiting(),
                }
            }
        }

        fn start_waiting(&mut self) {
            if self.life.is_open() && self.waiting {
                (self.busy, self.waiting) = (true, false);
            }
        }
    }

    /// Both ends under every order of events a connection sees, messages in order each way: no
    /// event is a violation, channels never close under work, and once the events stop and the
    /// messages and setups run out, no work is left waiting.
    #[test]
    fn any_order_of_events_leaves_no_work_waiting() {
        let mut rng = testkit::Rng::new("channel lifetimes");
        for _ in 0..2_000 {
            let mut ends = [true, false].map(|connector| End {
                life: ChannelLife::new(connector),
                inbox: Default::default(),
                busy: false,
                waiting: false,
                setup: None,
            });
            for step in 0..200 {
                let events_left = step < 150;
                let i = rng.below(2);
                let (this, peer) = if i == 0 {
                    let [c, a] = &mut ends;
                    (c, a)
                } else {
                    let [c, a] = &mut ends;
                    (a, c)
                };
                match rng.below(6) {
                    0 if events_left => {
                        // New work: on open channels at once, else it waits and wants them.
                        if this.life.is_open() {
                            this.busy = true;
                        } else {
                            this.waiting = true;
                            let actions = this.life.need();
                            this.carry_out(actions, &mut peer.inbox);
                        }
                    }
                    1 if events_left => this.busy = false,
                    2 if events_left && !this.busy && !this.waiting => {
                        if let Some(msg) = this.life.idle() {
                            peer.inbox.push_back(msg);
                        }
                    }
                    3 | 4 => {
                        let Some(msg) = this.inbox.pop_front() else { continue };
                        let quiet = !this.busy && !this.waiting;
                        let actions = this.life.handle(msg, quiet, this.waiting).expect("no violation");
                        this.carry_out(actions, &mut peer.inbox);
                    }
                    _ => {
                        if let Some(epoch) = this.setup.take()
                            && this.life.opened(epoch)
                        {
                            this.start_waiting();
                        }
                    }
                }
            }
            // Drain: every message delivered, every setup finished, until nothing changes.
            for _ in 0..50 {
                for i in 0..2 {
                    let [c, a] = &mut ends;
                    let (this, peer) = if i == 0 { (c, a) } else { (a, c) };
                    while let Some(msg) = this.inbox.pop_front() {
                        let quiet = !this.busy && !this.waiting;
                        let actions = this.life.handle(msg, quiet, this.waiting).expect("no violation");
                        this.carry_out(actions, &mut peer.inbox);
                    }
                    if let Some(epoch) = this.setup.take()
                        && this.life.opened(epoch)
                    {
                        this.start_waiting();
                    }
                }
            }
            for end in &ends {
                assert!(!end.waiting, "work left waiting: {:?}", end.life.life());
            }
        }
    }

    /// Messages the other end's role or the lifetime rules out fail the connection.
    #[test]
    fn messages_out_of_turn_are_violations() {
        let mut c = ChannelLife::new(true);
        let mut a = ChannelLife::new(false);
        let park = Control::ParkChannels { epoch: 0 };
        assert!(c.handle(park.clone(), true, false).is_err(), "the connector is never asked");
        assert!(a.handle(Control::ParkChannels { epoch: 3 }, true, false).is_err(), "another lifetime");
        let answer = Control::ChannelsParked { epoch: 0, parked: true };
        assert!(c.handle(answer.clone(), true, false).is_err(), "not asked");
        assert!(a.handle(answer, true, false).is_err(), "the acceptor never asks");
        assert!(c.handle(Control::WantChannels { epoch: 1 }, true, false).is_err(), "a later lifetime");
        let offer = Control::OpenChannels { epoch: 1, handles: vec![H] };
        assert!(a.handle(offer.clone(), true, false).is_err(), "not parked");
        assert!(c.handle(offer, true, false).is_err(), "not opening");
        a.handle(park.clone(), true, false).unwrap();
        assert!(a.handle(park, true, false).is_err(), "parked twice");
        let stale = Control::OpenChannels { epoch: 2, handles: vec![H] };
        assert!(a.handle(stale, true, false).is_err(), "skips a lifetime");
        assert!(a.handle(Control::Close, true, false).is_err());
    }
}
