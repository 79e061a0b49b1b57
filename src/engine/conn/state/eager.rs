//! Two-sided messages sent eagerly (`Control::EagerSend`, longer than an inline one and at most
//! `MAX_EAGER_LEN`): the chunks follow the message at once, as a write's do, which takes the
//! announce-grant round trip off a send whose receive is already posted.
//!
//! The receiver picks each message's destination when it reads the message, since that numbers
//! the flow: the oldest posted receive when no older message waits for one, else landing slots of
//! its own memory (`LandingMemory`), where the bytes wait for a receive and are copied into it.
//! Every answer (Done or Deny) leaves only once the message's slots are free again, and the sender
//! counts a message in slots against the inline-send backlog until its answer: so the slots a peer
//! holds never outnumber the landing memory's, and one asking for more breaks the protocol.
//!
//! The landing is scattered over free slots, the sender's buffer is one range: both cut the same
//! chunks only when chunks span segments, so only such connections send eagerly.

use std::sync::Arc;

use super::{Action, Announced, Body, ConnState, Direction, Flow, Memory, OnDone, PostedRecv, Source, deny_msg, fit};
use crate::engine::conn::landing::{Fate, Landings, MakeLanding};
use crate::engine::plan::{Cut, Extent, chunk_count};
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result};
use crate::proto::{Control, INLINE_LEN_FLOOR, MAX_EAGER_LEN, MAX_INLINE_SEND_BACKLOG, eager_landing_bytes};

impl ConnState {
    /// Makes eager sending possible on this connection (both ends decide alike from the agreed cut);
    /// the peer's messages land in memory `make` makes when the first one must.
    pub fn send_eagerly_with(&mut self, make: MakeLanding) {
        if self.chunking.cut == Cut::Spanning {
            self.eager = Some(Landings::new(make));
        }
    }

    /// Landing memory no message is in or on its way to goes until one lands again (the channels
    /// closed, or the connection idled); whether it went.
    pub fn give_back_landing(&mut self) -> bool {
        self.eager.as_mut().is_some_and(|l| l.give_back())
    }

    /// Whether this connection holds its landing memory now.
    pub fn holds_landing_memory(&self) -> bool {
        self.eager.as_ref().is_some_and(Landings::has_memory)
    }

    /// Whether a message of `len` bytes goes eagerly now.
    pub(super) fn goes_eagerly(&self, len: u64) -> bool {
        self.eager.is_some()
            && len > INLINE_LEN_FLOOR as u64
            && len <= MAX_EAGER_LEN
            && self.inline_send_backlog + eager_landing_bytes(len) <= MAX_INLINE_SEND_BACKLOG
    }

    /// Starts our eager message `id` from `src` (its flow pushed to `flows`); returns the message.
    pub(super) fn send_eagerly(
        &mut self,
        id: u64,
        src: Source,
        transfer: &Arc<Transfer>,
        flows: &mut Vec<Action>,
    ) -> Control {
        let len = src.extent.len();
        let backlog = eager_landing_bytes(len);
        self.inline_send_backlog += backlog;
        if let Some(l) = &mut self.eager {
            l.sent.insert(id, backlog);
        }
        let flow = self.start_sending(src, 1, OnDone::Part(transfer.clone()), None, flows);
        if let Some(f) = self.flows.get_mut(&flow) {
            // The receiver completes on our chunks alone, and it answers once its user posted.
            f.uncuttable = true;
            f.answer_from_user = true;
        }
        self.awaiting_done.insert(id, flow);
        Control::EagerSend { xfer: id, len }
    }

    /// The peer answered our op `xfer`: an eager message gives its backlog back.
    pub(super) fn eager_answered(&mut self, xfer: u64) {
        if let Some(backlog) = self.eager.as_mut().and_then(|l| l.sent.remove(&xfer)) {
            self.inline_send_backlog -= backlog;
        }
    }

    /// The peer's eager message `peer_op` of `len` bytes: its chunks are on their way.
    pub(super) fn eager_arrived(&mut self, peer_op: u64, len: u64, out: &mut Vec<Action>) -> Result<()> {
        if self.eager.is_none() {
            return Err(Error::backend("protocol violation: an eager send on a connection that agreed on none"));
        }
        if self.announces.is_empty()
            && let Some(recv) = self.posted_recvs.pop_front()
        {
            return match fit(recv, len, out) {
                Ok(recv) => {
                    let extent = Extent::Contiguous { addr: recv.addr, len };
                    let chunks = chunk_count(&extent, self.chunking);
                    let on_done = OnDone::PartAndAck(recv.transfer, peer_op);
                    let (flow, seq) = self.number_inbound();
                    let f = Flow::new(chunks, len, on_done, Some(recv.region.into()), None);
                    self.queue_flow(Direction::Recv, (flow, seq), extent, f, out);
                    Ok(())
                }
                // Its bytes go to scratch memory, and the refusal after them.
                Err(e) => self.receive_write(peer_op, Extent::Contiguous { addr: 0, len }, Err(e), out),
            };
        }
        self.land(peer_op, len, out)
    }

    /// Lands the peer's eager message in free slots until a receive takes it.
    fn land(&mut self, peer_op: u64, len: u64, out: &mut Vec<Action>) -> Result<()> {
        let violation = || {
            Error::backend(format!(
                "protocol violation: the peer's unmatched sends would hold more than {MAX_INLINE_SEND_BACKLOG} bytes here"
            ))
        };
        if self.held_for_peer() + eager_landing_bytes(len) > MAX_INLINE_SEND_BACKLOG {
            return Err(violation());
        }
        let (flow, seq) = self.number_inbound();
        let landings = self.eager.as_mut().expect("checked by the caller");
        let (extent, region) = landings.take(flow, peer_op, len)?.ok_or_else(violation)?;
        self.announced(Announced { peer_op, len, body: Body::Landing(flow) })?;
        let f = Flow::new(chunk_count(&extent, self.chunking), len, OnDone::Landing, Some(region.into()), None);
        self.queue_flow(Direction::Recv, (flow, seq), extent, f, out);
        Ok(())
    }

    /// The peer's eager messages that arrived before their receive and landed, so far.
    pub fn eager_landed(&self) -> u64 {
        self.eager.as_ref().map_or(0, Landings::landed)
    }

    /// Bytes of ours the peer's unmatched sends hold: inline payloads and landing slots.
    pub(super) fn held_for_peer(&self) -> u64 {
        self.announced_inline + self.eager.as_ref().map_or(0, Landings::held)
    }

    /// A receive was matched to the message landing by `flow` (`Err`: refused, the peer to be told
    /// so): delivers it if it is all in, else waits for its last chunk.
    pub(super) fn match_landing(
        &mut self,
        flow: u64,
        recv: Result<PostedRecv, Error>,
        mem: &impl Memory,
        answers: &mut Vec<Control>,
        out: &mut Vec<Action>,
    ) {
        let Some(landing) = self.eager.as_mut().and_then(|e| e.get_mut(flow)) else { return };
        landing.fate = match recv {
            Ok(recv) => Fate::Matched(recv),
            Err(e) => Fate::Refused(e),
        };
        if landing.arrived {
            self.settle(flow, mem, answers, out);
        }
    }

    /// The last chunk of the message landing by `flow` came in.
    pub(super) fn landed(&mut self, flow: u64, mem: &impl Memory, out: &mut Vec<Action>) {
        let Some(landing) = self.eager.as_mut().and_then(|e| e.get_mut(flow)) else { return };
        landing.arrived = true;
        if matches!(landing.fate, Fate::Waiting) {
            return;
        }
        let mut answers = Vec::new();
        self.settle(flow, mem, &mut answers, out);
        out.extend(answers.into_iter().map(Action::Send));
    }

    /// A landed message with its fate decided: copied into its receive (or refused), its slots
    /// freed, then its answer.
    fn settle(&mut self, flow: u64, mem: &impl Memory, answers: &mut Vec<Control>, out: &mut Vec<Action>) {
        let Some(landings) = self.eager.as_mut() else { return };
        let Some(mut landing) = landings.remove(flow) else { return };
        let (peer_op, len) = (landing.peer_op, landing.len);
        let answer = match std::mem::replace(&mut landing.fate, Fate::Waiting) {
            Fate::Waiting => unreachable!("settled only once matched"),
            Fate::Refused(e) => deny_msg(peer_op, &e),
            Fate::Matched(recv) => {
                // SAFETY: settled only once landed. The message fits the receive's registration
                // from its start (checked when matched; a cut since refused it), and `recv` keeps
                // the region.
                let stored =
                    unsafe { landings.copy_out(&landing, |at, bytes| mem.store(&recv.region, recv.addr + at, bytes)) };
                out.push(Action::Finish(recv.transfer, stored.clone().map(|()| len)));
                match stored {
                    Ok(()) => Control::Done { xfer: peer_op, len },
                    Err(e) => deny_msg(peer_op, &e),
                }
            }
        };
        landings.release(landing);
        answers.push(answer);
    }

    /// `region` was cut off: a receive waiting for a landing message in it fails now, and the
    /// message is refused once landed.
    pub(super) fn cut_landings(&mut self, region: u64, err: &Error, out: &mut Vec<Action>) {
        let Some(landings) = self.eager.as_mut() else { return };
        for landing in landings.iter_mut() {
            if let Fate::Matched(recv) = &landing.fate
                && recv.region.id == region
            {
                let Fate::Matched(recv) = std::mem::replace(&mut landing.fate, Fate::Refused(err.clone())) else {
                    unreachable!("matched just above")
                };
                out.push(Action::Finish(recv.transfer, Err(err.clone())));
            }
        }
    }

    /// The connection failed: receives waiting for landing messages, to be failed.
    pub(super) fn fail_landings(&mut self) -> Vec<Arc<Transfer>> {
        self.eager.as_mut().map_or_else(Vec::new, |l| l.fail().into_iter().map(|r| r.transfer).collect())
    }
}
