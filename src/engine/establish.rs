//! A connection's channels being set up: this end's listens, and the connects and accepts that
//! pair them with the peer's, polled a round at a time (plugin transports complete both
//! asynchronously). The handshake drives a setup to its end on its own thread; a connection
//! opening new channels after idle ones closed hands it to the engine's setup thread, with what
//! it keeps of the handshake for that (`Renewal`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::channel::{Channel, Windows};
use crate::error::{Error, Result};
use crate::proto::ChannelHello;
use crate::transport::{ListenComm, MrHandle, Net, NetHandle, RecvComm, RequestId, SendComm};

/// This side's listen comms: one for every channel, or one per channel (`Caps::listen_per_channel`).
#[derive(Default)]
pub struct Listens {
    handles: Vec<NetHandle>,
    comms: Vec<Box<dyn ListenComm>>,
}

impl Listens {
    /// Channel 0's listen on `net`, whose handle goes into Hello / Welcome.
    pub fn first(net: &dyn Net) -> Result<Listens> {
        let (handle, comm) = net.listen(net.channel_device(0))?;
        Ok(Listens { handles: vec![handle], comms: vec![comm] })
    }

    /// Listens on `net` for `n` new channels: the listens, and each channel's handle (the one
    /// listen's, repeated, where one serves every channel).
    pub fn for_channels(net: &dyn Net, n: usize) -> Result<(Listens, Vec<NetHandle>)> {
        let mut listens = Listens::first(net)?;
        listens.open_rest(net, n)?;
        let handles = if net.caps().listen_per_channel { listens.handles.clone() } else { vec![listens.handles[0]; n] };
        Ok((listens, handles))
    }

    pub fn first_handle(&self) -> NetHandle {
        self.handles[0]
    }

    /// Listens on `net` for channels 1..n when each channel needs its own; returns their handles.
    pub fn open_rest(&mut self, net: &dyn Net, n: usize) -> Result<&[NetHandle]> {
        if net.caps().listen_per_channel {
            for ch in self.comms.len()..n {
                let (handle, comm) = net.listen(net.channel_device(ch))?;
                self.handles.push(handle);
                self.comms.push(comm);
            }
        }
        Ok(&self.handles[1..])
    }
}

/// A channel hello in flight: its boxed buffer stays put until the request finished.
struct HelloIo {
    buf: Box<[u8; 16]>,
    req: RequestId,
}

/// What a round of channel setup came to.
pub enum Step {
    /// Every channel has both its comms.
    Done,
    /// Something connected, was accepted or said hello: another round may go on at once.
    Moved,
    /// Nothing yet.
    Waiting,
}

/// Channel setup under way, one round at a time (`step`): this end's send comms connecting to the
/// peer's handles and its listens accepting the peer's, polled together (plugin transports
/// complete both asynchronously). The handshake drives it to the end on its own thread; a
/// connection opening its parked channels again hands it to the engine's setup thread.
///
/// With a listen per channel the pairing is the handle order itself: channel `i` connects to the
/// peer's `i`-th handle, and whatever the `i`-th listen accepts is channel `i`, so no byte moves
/// before the channels exist. That matters for TCPX, whose receive comms are flow-steered into GPU
/// memory at accept and cannot take a host-memory receive. A listen shared by every channel (the
/// socket transport) accepts in any order: each send comm then opens with a ChannelHello naming its
/// channel and the session's nonce.
pub struct Establishing {
    net: Arc<dyn Net>,
    n: usize,
    nonce: u64,
    shared_listen: bool,
    // The comms go before the buffers their hellos are read from and written into.
    sends: Vec<Option<Box<dyn SendComm>>>,
    accepted: Vec<(Box<dyn RecvComm>, HelloIo)>,
    recvs: Vec<Option<Box<dyn RecvComm>>>,
    hellos_out: Vec<Option<HelloIo>>,
    /// One buffer per connect attempt, kept in place while it is polled (plugins keep state in it).
    handles: Vec<NetHandle>,
    listens: Listens,
    listen_done: Vec<bool>,
}

impl Establishing {
    /// `handles`: the peer's listen handles, one a channel.
    pub fn new(net: Arc<dyn Net>, listens: Listens, handles: Vec<NetHandle>, n: usize, nonce: u64) -> Result<Self> {
        if handles.len() != n {
            return Err(Error::backend(format!("internal: {} peer handles for {n} channels", handles.len())));
        }
        let shared_listen = !net.caps().listen_per_channel;
        if !shared_listen && listens.comms.len() != n {
            return Err(Error::backend(format!("internal: {} listens for {n} channels", listens.comms.len())));
        }
        Ok(Establishing {
            net,
            n,
            nonce,
            shared_listen,
            sends: (0..n).map(|_| None).collect(),
            accepted: Vec::new(),
            recvs: (0..n).map(|_| None).collect(),
            hellos_out: (0..n).map(|_| None).collect(),
            handles,
            listen_done: vec![false; listens.comms.len()],
            listens,
        })
    }

    /// One round of connects, accepts and channel hellos.
    pub fn step(&mut self) -> Result<Step> {
        let (n, net) = (self.n, &*self.net);
        let mut moved = false;
        for (i, slot) in self.sends.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            if let Some(mut comm) = net.connect(net.channel_device(i), &mut self.handles[i])? {
                if self.shared_listen {
                    let buf = Box::new(ChannelHello { channel: i as u16, nonce: self.nonce }.to_bytes());
                    // SAFETY: `buf` is boxed and kept in `hellos_out` until the send is tested done.
                    let req = unsafe { comm.isend(buf.as_ptr(), buf.len(), MrHandle::NONE)? }
                        .ok_or_else(|| Error::backend("a fresh comm has no free request slot"))?;
                    self.hellos_out[i] = Some(HelloIo { buf, req });
                }
                *slot = Some(comm);
                moved = true;
            }
        }
        for (j, listen) in self.listens.comms.iter_mut().enumerate() {
            let wanted = if self.shared_listen {
                self.accepted.len() + self.recvs.iter().filter(|r| r.is_some()).count() < n
            } else {
                !self.listen_done[j]
            };
            if !wanted {
                continue;
            }
            if let Some(mut comm) = listen.accept()? {
                moved = true;
                if !self.shared_listen {
                    self.listen_done[j] = true;
                    self.recvs[j] = Some(comm);
                    continue;
                }
                let mut buf = Box::new([0u8; 16]);
                // SAFETY: `buf` is boxed and kept with the comm until the receive is consumed.
                let req = unsafe { comm.irecv(buf.as_mut_ptr(), buf.len(), MrHandle::NONE)? }
                    .ok_or_else(|| Error::backend("a fresh comm has no free request slot"))?;
                self.accepted.push((comm, HelloIo { buf, req }));
            }
        }
        for (comm, hello) in self.sends.iter_mut().zip(self.hellos_out.iter_mut()) {
            if let (Some(comm), Some(io)) = (comm, hello.as_ref())
                && comm.test(io.req)?.is_some()
            {
                *hello = None;
                moved = true;
            }
        }
        let mut i = 0;
        while i < self.accepted.len() {
            let (comm, io) = &mut self.accepted[i];
            match comm.test(io.req)? {
                None => i += 1,
                Some(size) => {
                    let (mut comm, io) = self.accepted.swap_remove(i);
                    let hello = ChannelHello::from_bytes(&io.buf[..size.min(16)])?;
                    comm.irecv_consumed(io.req)?;
                    let ch = hello.channel as usize;
                    if hello.nonce != self.nonce || ch >= n || self.recvs[ch].is_some() {
                        return Err(Error::backend(format!(
                            "protocol violation: unexpected channel hello (channel {ch} of {n}, nonce match {})",
                            hello.nonce == self.nonce
                        )));
                    }
                    self.recvs[ch] = Some(comm);
                    moved = true;
                }
            }
        }
        Ok(match self.ready() {
            (sent, received) if sent == n && received == n => Step::Done,
            _ if moved => Step::Moved,
            _ => Step::Waiting,
        })
    }

    /// Send comms connected (their hello sent), receive comms accepted (their hello read).
    fn ready(&self) -> (usize, usize) {
        let sent = self.sends.iter().zip(&self.hellos_out).filter(|(s, h)| s.is_some() && h.is_none()).count();
        (sent, self.recvs.iter().filter(|r| r.is_some()).count())
    }

    /// The error of a setup past its deadline, saying how far it got.
    pub fn timed_out(&self) -> Error {
        let ((sent, received), n) = (self.ready(), self.n);
        Error::timeout(format!(
            "channel setup did not finish in time: {sent}/{n} send and {received}/{n} receive comms ready"
        ))
    }

    /// The channels of a finished setup. `ahead`: each comm makes now what a first transfer of GPU
    /// memory over it would (not where the same-host GPU path carries that memory).
    pub fn into_channels(self, window: usize, removals: &Arc<AtomicU64>, ahead: bool) -> Result<Vec<Channel>> {
        let window = window.min(self.net.properties(0)?.max_requests);
        let windows = Windows::new(self.net.caps().max_registration);
        self.sends
            .into_iter()
            .zip(self.recvs)
            .map(|pair| {
                let (Some(mut s), Some(mut r)) = pair else {
                    return Err(Error::backend("internal: channels made of a setup that had not finished"));
                };
                if ahead {
                    s.make_ahead();
                    r.make_ahead();
                }
                Ok(Channel::new(s, r, window, windows, removals.clone()))
            })
            .collect()
    }
}

/// How long a net plugin's channels stay idle before the connector closes them, unless set.
const PLUGIN_IDLE_CLOSE: Duration = Duration::from_secs(60);

/// What a connection makes new channels with: the transport and session of its handshake's.
pub(crate) struct Renewal {
    pub net: Arc<dyn Net>,
    pub nonce: u64,
    /// The comms make ahead what a first transfer of GPU memory over them would.
    pub ahead: bool,
    /// How long the channels stay idle before this end, if the connector, closes them; zero: never.
    pub idle_close: Duration,
}

impl Renewal {
    /// `configured` (`UCCL_TCPX_IDLE_CLOSE_MS`), else 60 s on a transport whose idle comms cost
    /// (a net plugin's) and never on others.
    pub fn idle_close(configured: Option<Duration>, net: &dyn Net) -> Duration {
        configured.unwrap_or(if net.caps().idle_comms_cost { PLUGIN_IDLE_CLOSE } else { Duration::ZERO })
    }
}
