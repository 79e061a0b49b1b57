//! A transport's comms driven directly, as NCCL's proxy drives a net plugin's, without an engine.

use std::collections::VecDeque;
use std::time::Duration;

use uccl_tcpx::internal::transport::{ListenComm, MrHandle, Net, RecvComm, RequestId, SendComm};

use super::engine::TRANSFER_LIMIT;
use testkit::PATIENCE;

/// A connected send comm on device `dev` and the receive comm the listener accepted for it, set up
/// as NCCL's proxy does: connect and accept polled in turn until both are done.
pub fn comm_pair(net: &dyn Net, dev: usize) -> (Box<dyn SendComm>, Box<dyn RecvComm>, Box<dyn ListenComm>) {
    let (handle, mut listen) = net.listen(dev).unwrap();
    let mut theirs = handle;
    let (mut send, mut recv) = (None, None);
    testkit::drive("connect and accept", PATIENCE, || {
        if send.is_none() {
            send = net.connect(dev, &mut theirs).unwrap();
        }
        if recv.is_none() {
            recv = listen.accept().unwrap();
        }
        (send.is_some() && recv.is_some()).then_some(())
    });
    (send.unwrap(), recv.unwrap(), listen)
}

/// The next comm `listen` hands out, polled until `limit`; `None` if none came.
pub fn accept_within(listen: &mut dyn ListenComm, limit: Duration) -> Option<Box<dyn RecvComm>> {
    testkit::poll::poll(limit, || listen.accept().unwrap())
}

/// The next comm `listen` hands out; fails the test if none comes.
pub fn accept(listen: &mut dyn ListenComm) -> Box<dyn RecvComm> {
    accept_within(listen, PATIENCE).expect("the listener handed out no comm")
}

/// Moves every message of `srcs` from `send` to `recv`, keeping as many requests in flight in each
/// direction as the comms take. Receives are posted `slack` bytes larger than their message (the
/// sender's size wins); each is checked byte for byte, and its slack must stay untouched. Returns the
/// most sends that were in flight at once.
pub fn stream(send: &mut dyn SendComm, recv: &mut dyn RecvComm, srcs: &[Vec<u8>], slack: usize) -> usize {
    let count = srcs.len();
    let mut dsts: Vec<Vec<u8>> = srcs.iter().map(|s| vec![0u8; s.len() + slack]).collect();
    let (mut next_send, mut next_recv, mut checked) = (0, 0, 0);
    let mut sends: VecDeque<RequestId> = VecDeque::new();
    let mut recvs: VecDeque<(usize, RequestId)> = VecDeque::new();
    let mut max_in_flight = 0;
    testkit::drive(&format!("{count} messages arrive"), TRANSFER_LIMIT, || {
        while next_recv < count {
            let d = &mut dsts[next_recv];
            // SAFETY: `dsts` outlives the request, which is consumed before it is read.
            let Some(id) = (unsafe { recv.irecv(d.as_mut_ptr(), d.len(), MrHandle(0)) }).unwrap() else { break };
            recvs.push_back((next_recv, id));
            next_recv += 1;
        }
        while next_send < count {
            let s = &srcs[next_send];
            // SAFETY: `srcs` outlives every request.
            let Some(id) = (unsafe { send.isend(s.as_ptr(), s.len(), MrHandle(0)) }).unwrap() else { break };
            sends.push_back(id);
            next_send += 1;
        }
        max_in_flight = max_in_flight.max(sends.len());
        while let Some(&id) = sends.front() {
            if send.test(id).unwrap().is_none() {
                break;
            }
            sends.pop_front();
        }
        while let Some(&(i, id)) = recvs.front() {
            let Some(n) = recv.test(id).unwrap() else { break };
            assert_eq!(n, srcs[i].len(), "message {i}: the receive reports the sender's size");
            assert!(dsts[i][..n] == srcs[i][..], "message {i} of {n} bytes arrived corrupted");
            assert!(dsts[i][n..].iter().all(|&b| b == 0), "message {i}: bytes past the message were written");
            recv.irecv_consumed(id).unwrap();
            recvs.pop_front();
            checked += 1;
        }
        (checked == count).then_some(())
    });
    while let Some(id) = sends.pop_front() {
        testkit::drive(&format!("send {id:?} completes"), TRANSFER_LIMIT, || send.test(id).unwrap());
    }
    max_in_flight
}
