//! The `flow` trace's records of a connection's messages, requests and flows (docs/TRACE.md):
//! what each message is called and which request it names, the flows planned for them, and the
//! same-host requests of the `host` trace.

use crate::engine::plan::{self, Chunking};
use crate::proto::{Control, Frame};
use crate::trace::{self, MsgKind};

use super::state::{Action, Direction, FlowPlan};

/// What the `flow` trace calls a message of a write's or read's, and the request id it names.
pub(super) fn flow_msg(msg: &Control) -> Option<(u64, MsgKind)> {
    Some(match *msg {
        Control::WriteRequest { xfer, .. } | Control::WriteVector { xfer, .. } | Control::WriteRuns { xfer, .. } => {
            (xfer, MsgKind::WriteRequest)
        }
        Control::ReadRequest { xfer, .. } | Control::ReadVector { xfer, .. } | Control::ReadRuns { xfer, .. } => {
            (xfer, MsgKind::ReadRequest)
        }
        Control::Done { xfer, .. } => (xfer, MsgKind::Done),
        Control::Data { flow, .. } => (flow, MsgKind::Data),
        Control::InlineWrite { xfer, .. } => (xfer, MsgKind::InlineWrite),
        Control::ReadSmall { xfer, .. } => (xfer, MsgKind::ReadSmall),
        Control::ReadData { xfer, .. } => (xfer, MsgKind::ReadData),
        Control::InlineSend { xfer, .. } => (xfer, MsgKind::InlineSend),
        _ => return None,
    })
}

/// `flow_msg` of a message whose payload is lent from the reader's buffer.
pub(super) fn lent_msg(frame: &Frame<'_>) -> Option<(u64, MsgKind)> {
    Some(match *frame {
        Frame::InlineWrite { xfer, .. } => (xfer, MsgKind::InlineWrite),
        Frame::ReadData { xfer, .. } => (xfer, MsgKind::ReadData),
        Frame::InlineSend { xfer, .. } => (xfer, MsgKind::InlineSend),
        Frame::Whole(_) => return None,
    })
}

/// Records the flow the state planned for the peer's request `id` (a target's), or for our read
/// whose Data marker `id` announces its chunks.
pub(super) fn trace_heard(tag: trace::ConnTag, id: u64, kind: MsgKind, out: &[Action], chunking: Chunking) {
    let (dir, ours) = match kind {
        MsgKind::WriteRequest => (Direction::Recv, false),
        MsgKind::ReadRequest => (Direction::Send, false),
        MsgKind::Data => (Direction::Recv, true),
        _ => return,
    };
    let planned = out.iter().find_map(|a| match a {
        Action::Queue(plan) if plan.dir == dir && (!ours || plan.flow == id) => Some(plan),
        _ => None,
    });
    if let Some(plan) = planned {
        trace_plan(tag, id, ours, plan, chunking);
    }
}

/// Records that flow `plan` carries request `xfer`, ours or the peer's.
fn trace_plan(tag: trace::ConnTag, xfer: u64, ours: bool, plan: &FlowPlan, chunking: Chunking) {
    let (ours, recv) = (u64::from(ours), u64::from(plan.dir == Direction::Recv));
    let (flow, seq, bytes, chunks) =
        (plan.flow, plan.seq, plan.extent.len(), plan::chunk_count(&plan.extent, chunking));
    trace::event!(FlowPlan {
        conn: tag.conn,
        side: tag.side,
        xfer,
        ours,
        flow,
        seq,
        bytes,
        chunks: chunks as u64,
        recv
    });
}

/// Records the direct requests among a post's messages (the `host` trace): the post asked for the
/// same-host copy, of that many bytes.
pub(super) fn trace_direct(tag: trace::ConnTag, transfer: u64, msgs: &[Control], at: u64) {
    let (mut write, mut bytes, mut direct) = (false, 0u64, false);
    for msg in msgs {
        if let Control::DirectWrite { segs, .. } | Control::DirectRead { segs, .. } = msg {
            write = matches!(msg, Control::DirectWrite { .. });
            bytes += segs.iter().map(|s| u64::from(s.len)).sum::<u64>();
            direct = true;
        }
    }
    if direct {
        let write = u64::from(write);
        trace::event!(HostPosted { conn: tag.conn, side: tag.side, transfer, write, bytes, entered: at });
    }
}

/// Records the requests among a post's actions (the `flow` trace), and the flows of its writes,
/// whose chunks the actions queue in the order of their requests.
pub(super) fn trace_requests(tag: trace::ConnTag, transfer: u64, out: &[Action], chunking: Chunking) {
    let mut writes = std::collections::VecDeque::new();
    for action in out {
        match action {
            Action::Send(msg) => {
                let (xfer, write, chunks) = match *msg {
                    Control::WriteRequest { xfer, .. }
                    | Control::WriteVector { xfer, .. }
                    | Control::WriteRuns { xfer, .. } => (xfer, true, true),
                    Control::ReadRequest { xfer, .. }
                    | Control::ReadVector { xfer, .. }
                    | Control::ReadRuns { xfer, .. } => (xfer, false, true),
                    // Inline: the payload rides the request or its answer; no flow is planned.
                    Control::InlineWrite { xfer, .. } => (xfer, true, false),
                    Control::ReadSmall { xfer, .. } => (xfer, false, false),
                    _ => continue,
                };
                trace::event!(FlowRequest { conn: tag.conn, side: tag.side, transfer, xfer, write: u64::from(write) });
                if write && chunks {
                    writes.push_back(xfer);
                }
            }
            Action::Queue(plan) if plan.dir == Direction::Send => {
                if let Some(xfer) = writes.pop_front() {
                    trace_plan(tag, xfer, true, plan, chunking);
                }
            }
            _ => {}
        }
    }
}
