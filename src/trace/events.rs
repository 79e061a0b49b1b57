//! The one list of trace events. Each is declared once below, as a name, the categories that
//! record it and its fields: plain integers (ids, bytes, nanoseconds, codes), never an engine type.
//! The enum, the schema written at the head of every trace file, and thereby what the scripts of
//! `scripts/diag/` read, all come from this table; a new event is a line here and a call at its
//! site.
//!
//! Ids that join events across threads and processes: `conn` is a connection's handshake nonce
//! (both ends know it) and `side` says which end (1 the connector, 0 the acceptor); `transfer` a
//! caller's transfer id on that end; `xfer` the id a request carries on the wire; `flow` a
//! connection end's flow id; `comm` a socket comm's id (both ends' hellos carry it) or a staged
//! comm's number in its process; `job` and `chunk` ids drawn from `next_id`.

/// The categories `UCCL_TCPX_TRACE` may name, each a bit of an event's mask.
pub const FLOW: u32 = 1;
pub const SOCKET: u32 = 2;
pub const HOST: u32 = 4;
pub const DEVICE: u32 = 8;
pub const STAGING: u32 = 16;
pub const CATEGORIES: [(&str, u32); 5] =
    [("flow", FLOW), ("socket", SOCKET), ("host", HOST), ("device", DEVICE), ("staging", STAGING)];

/// One event's declaration, as the file's schema lines repeat it.
#[derive(Clone, Copy, Debug)]
pub struct Schema {
    pub label: &'static str,
    pub categories: u32,
    pub fields: &'static [&'static str],
}

macro_rules! events {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident = $label:literal, $($cat:ident)|+ { $($field:ident),* $(,)? };
    )*) => {
        /// A trace event: see the table in `trace/events.rs`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Event {
            $($(#[doc = $doc])* $name { $($field: u64),* },)*
        }

        impl Event {
            /// The categories that record it.
            pub const fn categories(&self) -> u32 {
                match self { $(Event::$name { .. } => 0 $(| $cat)+,)* }
            }

            /// Its index in `SCHEMA`.
            pub const fn index(&self) -> usize {
                #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
                enum Index { $($name),* }
                match self { $(Event::$name { .. } => Index::$name as usize,)* }
            }

            /// Its fields' values, in declaration order.
            pub fn values(&self, out: &mut Vec<u64>) {
                match *self { $(Event::$name { $($field),* } => { $(out.push($field);)* })* }
            }
        }

        /// Every event, in declaration order.
        pub const SCHEMA: &[Schema] = &[$(Schema {
            label: $label,
            categories: 0 $(| $cat)+,
            fields: &[$(stringify!($field)),*],
        }),*];
    };
}

events! {
    /// A caller entered a write or read that takes the channels, at `entered`.
    FlowCall = "flow_call", FLOW { conn, side, transfer, entered };
    /// That call returned the transfer to its caller.
    FlowReturned = "flow_returned", FLOW { conn, side, transfer };
    /// The call made request `xfer` (`write` 1, else a read).
    FlowRequest = "flow_request", FLOW { conn, side, transfer, xfer, write };
    /// Flow `flow` (the `seq`-th of its direction, `bytes` in `chunks` chunks, `recv` 1 when this
    /// end receives) carries request `xfer`, ours (`ours` 1) or the peer's.
    FlowPlan = "flow_plan", FLOW { conn, side, xfer, ours, flow, seq, bytes, chunks, recv };
    /// A message of a flow's (`kind`: `MsgKind`; `id` the request's xfer) was written or queued
    /// for the control stream.
    FlowMsgOut = "flow_msg_out", FLOW { conn, side, id, kind };
    /// The peer's message was handled, read from the stream at `arrived`; the row's thread read it.
    FlowMsgIn = "flow_msg_in", FLOW { conn, side, id, kind, arrived };
    /// A flow's chunks were queued on the channels.
    FlowQueued = "flow_queued", FLOW { conn, side, flow };
    /// A send chunk of the flow was handed to the transport.
    FlowChunkPosted = "flow_chunk_posted", FLOW { conn, side, flow };
    /// A pass over the channels after chunks were queued: it posted the receives it could.
    FlowPass = "flow_pass", FLOW { conn, side };
    /// A chunk of the flow completed.
    FlowChunkDone = "flow_chunk_done", FLOW { conn, side, flow };
    /// A post failed before anything reached the wire: its transfer id is forgotten.
    FlowDiscarded = "flow_discarded", FLOW { conn, side, transfer };
    /// The caller was handed the transfer's outcome.
    CallDone = "call_done", FLOW | HOST | DEVICE { conn, side, transfer };

    /// Socket `socket` of send comm `comm` took a piece of request `seq`.
    SockTake = "sock_take", SOCKET { comm, seq, socket };
    /// It wrote the piece's last byte (`bytes` the piece's payload).
    SockSent = "sock_sent", SOCKET { comm, seq, socket, bytes };
    /// Socket `socket` of send comm `comm` (over data links) left the next piece, of `bytes`, to a
    /// faster socket: it would have finished it after the others finished everything (`pace`).
    SockDeclined = "sock_declined", SOCKET { comm, socket, bytes };
    /// Socket `socket` of receive comm `comm` read a piece's header of request `seq`.
    SockHeader = "sock_header", SOCKET { comm, seq, socket };
    /// The piece was admitted into the posted receive.
    SockAdmit = "sock_admit", SOCKET { comm, seq, socket };
    /// The piece landed whole.
    SockLanded = "sock_landed", SOCKET { comm, seq, socket, bytes };
    /// Send comm `comm` started dialing added socket `socket`, its traffic having asked for it.
    SockDial = "sock_dial", SOCKET { comm, socket };
    /// The receiving side read the hello of added socket `socket` of comm `comm`: its comm took it
    /// and acknowledged it (`taken` 1), or it was refused (0).
    SockFiled = "sock_filed", SOCKET { comm, socket, taken };
    /// Added socket `socket` of send comm `comm` read its acknowledgement: it pulls pieces now.
    SockOpened = "sock_opened", SOCKET { comm, socket };
    /// Socket `socket` of send comm `comm` (over several links) was declared dead (`why`: `DeadWhy`).
    SockDead = "sock_dead", SOCKET { comm, socket, why };
    /// `pieces` pieces (`bytes` of payload) that socket `socket` carried go out again on the
    /// others (`cause`: `ResendCause`); none when all were acknowledged.
    SockResent = "sock_resent", SOCKET { comm, socket, pieces, bytes, cause };
    /// The link of socket `link` is dialed again (`attempt` since it last carried pieces) from
    /// spare slot `socket`.
    SockRedial = "sock_redial", SOCKET { comm, link, attempt, socket };
    /// That socket joined: the link carries pieces again.
    SockRejoined = "sock_rejoined", SOCKET { comm, link, attempt, socket };
    /// That attempt failed: no connection could start, or it did not join (in time).
    SockRedialFailed = "sock_redial_failed", SOCKET { comm, link, attempt, socket };

    /// A same-host host-memory write or read asked for the direct copy, posted at `entered`.
    HostPosted = "host_posted", HOST { conn, side, transfer, write, bytes, entered };
    /// A copy job was offered to the process's copy helpers.
    HostOffered = "host_offered", HOST { job };
    /// A helper came to take pieces of the job.
    HostJoined = "host_joined", HOST { job };
    /// A piece of `bytes` that began at `start` ended on the row's thread.
    HostPiece = "host_piece", HOST { job, start, bytes };
    /// The job ran: our read `transfer` (0: the peer's write), `bytes`, queued at `queued`, picked
    /// up at `picked`, by a waiting caller (`by_caller` 1) or the worker. Refused jobs leave none.
    HostCopied = "host_copied", HOST { job, conn, side, transfer, bytes, queued, picked, by_caller };

    /// Same-host GPU copies of a transfer were queued: `batches` batches, `bytes` in all, after
    /// `asks` asks to the owner that took `ask_ns`; the call began at `entered`.
    DeviceIssued = "device_issued", DEVICE { conn, side, transfer, write, bytes, batches, entered, asks, ask_ns };
    /// A batch of the transfer was seen finished (`by`: `SeenBy`).
    DeviceSeen = "device_seen", DEVICE { conn, side, transfer, by };
    /// An ask to the owner for region `region`'s grant (by a transfer or `prepare`): sent at
    /// `asked`, answered at `answered`, the allocation mapped at the event (0: not granted).
    DeviceAsked = "device_asked", DEVICE { conn, side, region, asked, answered, granted };

    /// Staged comm `comm` (`send` 1 or receive) accepted chunk `chunk` of `bytes`; `staged` 1 when
    /// it goes through a pinned slot.
    StageChunk = "stage_chunk", STAGING { comm, chunk, send, bytes, staged };
    /// The chunk reached a stage (`step`: `StageStep`).
    StageStep = "stage_step", STAGING { comm, chunk, step };
    /// Queueing the chunk's copy took `issue_ns` in `parts` copies.
    StageIssue = "stage_issue", STAGING { comm, chunk, issue_ns, parts };
    /// The engine's calls into the comm since its last such row: `tests` test calls, the time
    /// inside calls, the longest gap between tests and the longest call, and the gaps between
    /// tests by length (under 5, 20, 100, 1000 us, longer).
    StageCalls = "stage_calls", STAGING { comm, tests, busy_ns, max_gap_ns, max_call_ns, gaps_5, gaps_20, gaps_100, gaps_1000, gaps_more };
}

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $name:ident ($field:literal) { $($variant:ident = $value:literal $label:literal),* $(,)? })*) => {
        $(
            $(#[doc = $doc])*
            #[derive(Clone, Copy, Debug, PartialEq, Eq)]
            pub enum $name { $($variant = $value),* }
        )*

        /// Every coded field's values and their names: (field, value, name).
        pub const CODES: &[(&str, u64, &str)] = &[$($(($field, $value, $label)),*),*];
    };
}

codes! {
    /// What a flow message is (`kind` of `FlowMsgOut` and `FlowMsgIn`).
    MsgKind("kind") {
        WriteRequest = 1 "write_request",
        ReadRequest = 2 "read_request",
        Done = 3 "done",
        Data = 4 "data",
        InlineWrite = 5 "inline_write",
        ReadSmall = 6 "read_small",
        ReadData = 7 "read_data",
        InlineSend = 8 "inline_send",
    }
    /// Who saw a device-copy batch finished.
    SeenBy("by") { Poll = 0 "poll", Wait = 1 "wait", Progress = 2 "progress", Failure = 3 "failure" }
    /// Why a data socket was declared dead (`SockDead`).
    DeadWhy("why") {
        Failed = 1 "failed",
        Closed = 2 "closed",
        Silent = 3 "silent",
        NotJoined = 4 "not_joined",
    }
    /// Why pieces go out again (`SockResent`): their socket died, or an acknowledgement is overdue.
    ResendCause("cause") { Dead = 1 "dead", AckOverdue = 2 "ack_overdue" }
    /// A staged chunk's stages (its acceptance is `StageChunk`).
    StageMark("step") {
        CopyIssued = 1 "copy_issued",
        CopySeen = 2 "copy_seen",
        Handed = 4 "handed",
        InnerDone = 5 "inner_done",
        Reported = 6 "reported",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_matches_the_enum() {
        let e = Event::FlowPlan { conn: 1, side: 0, xfer: 2, ours: 1, flow: 3, seq: 4, bytes: 5, chunks: 6, recv: 0 };
        let schema = SCHEMA[e.index()];
        assert_eq!(schema.label, "flow_plan");
        let mut v = Vec::new();
        e.values(&mut v);
        assert_eq!(v, [1, 0, 2, 1, 3, 4, 5, 6, 0]);
        assert_eq!(schema.fields.len(), v.len());
        assert_eq!(schema.fields[4], "flow");
        assert_eq!(Event::CallDone { conn: 0, side: 0, transfer: 0 }.categories(), FLOW | HOST | DEVICE);
        let labels: std::collections::HashSet<_> = SCHEMA.iter().map(|s| s.label).collect();
        assert_eq!(labels.len(), SCHEMA.len(), "labels are unique");
        assert!(SCHEMA.iter().all(|s| s.categories != 0));
    }

    #[test]
    fn codes_name_their_values() {
        assert_eq!(SeenBy::Progress as u64, 2);
        assert!(CODES.contains(&("by", 2, "progress")));
        assert!(CODES.contains(&("step", StageMark::InnerDone as u64, "inner_done")));
        assert!(CODES.contains(&("kind", MsgKind::Data as u64, "data")));
        assert!(CODES.contains(&("why", DeadWhy::Silent as u64, "silent")));
        let fields: std::collections::HashSet<_> = CODES.iter().map(|(f, v, _)| (*f, *v)).collect();
        assert_eq!(fields.len(), CODES.len(), "one name per coded field and value");
    }
}
