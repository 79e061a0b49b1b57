//! Staging over the socket transport with host memory (runs everywhere); the device paths are
//! exercised by tests/gpu_staging.rs on machines with a GPU.

use std::sync::Arc;

use super::*;
use crate::error::UcclStatus;
use crate::transport::socket::writes_back;
use crate::transport::testutil::{loopback_socket_net, pair, receive_counting_write_back, until, written_back_alone};
use crate::transport::{MemKind, MrHandle, MrRun, RequestId};

fn staged() -> Arc<dyn Net> {
    StagedNet::wrap(Arc::new(loopback_socket_net()), StagingParams::new(64 << 10, 4)).unwrap()
}

#[test]
fn properties_claim_cuda_and_keep_the_inner_name() {
    let net = staged();
    let props = net.properties(0).unwrap();
    assert!(props.supports_cuda && props.supports_host);
    assert_eq!(net.caps().name, "socket", "the wire is unchanged, so the handshake must see the same transport");
    assert_eq!(props.max_requests, 16);
}

#[test]
fn wrap_validates_its_ring() {
    let socket: Arc<dyn Net> = Arc::new(loopback_socket_net());
    for params in [
        StagingParams::new(0, 4),
        StagingParams::new((4 << 20) + 1, 4),
        StagingParams::new(4096, 0),
        StagingParams::new(4096, 17),
    ] {
        let err = StagedNet::wrap(socket.clone(), params).err().expect("refused");
        assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{params:?}: {err}");
    }
}

#[test]
fn host_memory_passes_through_registered_or_not() {
    let net = staged();
    let (mut tx, mut rx) = pair(&*net);
    let msgs: Vec<Vec<u8>> = (0..40).map(|i| (0..1 + i * 997).map(|j| (i * 31 + j) as u8).collect()).collect();
    let mut bufs: Vec<Vec<u8>> = (0..40).map(|_| vec![0u8; 48 << 10]).collect();
    let mut region = vec![0u8; 40 * (40 << 10)];
    let region_ptr = region.as_mut_ptr();
    let smr = tx.reg_mr(region_ptr as usize, region.len(), MemKind::Host).unwrap();
    assert_ne!(smr, MrHandle::NONE);
    let mut sent = 0;
    let mut received = 0;
    let mut sreqs = std::collections::VecDeque::new();
    let mut rreqs = std::collections::VecDeque::new();
    // Keep up to 16 of each in flight; alternate registered and unregistered posts.
    while received < msgs.len() {
        while rreqs.len() < 16 && received + rreqs.len() < msgs.len() {
            let i = received + rreqs.len();
            // SAFETY: bufs[i] is a live 48 KiB Vec, read only after its receive is reported done, and the
            // loop ends only when every receive has completed.
            let r = unsafe { rx.irecv(bufs[i].as_mut_ptr(), bufs[i].len(), MrHandle::NONE) }.unwrap().unwrap();
            rreqs.push_back(r);
        }
        while sreqs.len() < 16 && sent < msgs.len() {
            let mr = if sent % 2 == 0 { MrHandle::NONE } else { smr };
            // Registered posts must lie in the registration; the message is copied into it.
            let (ptr, len) = if mr == MrHandle::NONE {
                (msgs[sent].as_ptr(), msgs[sent].len())
            } else {
                // SAFETY: sent < 40 and region holds 40 slots of 40 KiB, so the slot's start lies inside
                // region.
                let dst = unsafe { region_ptr.add(sent * (40 << 10)) };
                // SAFETY: each message is at most 1 + 39 * 997 bytes, under the 40 KiB slot at dst, and msgs
                // and region do not overlap; no send reads this slot yet.
                unsafe { std::ptr::copy_nonoverlapping(msgs[sent].as_ptr(), dst, msgs[sent].len()) };
                (dst as *const u8, msgs[sent].len())
            };
            // SAFETY: ptr is msgs[sent] or its copy in region (inside smr's registration); both live to the
            // end of the test, which tests every send to completion.
            match unsafe { tx.isend(ptr, len, mr) }.unwrap() {
                Some(r) => {
                    sreqs.push_back(r);
                    sent += 1;
                }
                None => break,
            }
        }
        if let Some(&r) = sreqs.front()
            && tx.test(r).unwrap().is_some()
        {
            sreqs.pop_front();
        }
        if let Some(&r) = rreqs.front()
            && let Some(size) = rx.test(r).unwrap()
        {
            assert_eq!(size, msgs[received].len());
            assert_eq!(&bufs[received][..size], &msgs[received][..], "message {received}");
            rx.irecv_consumed(r).unwrap();
            rreqs.pop_front();
            received += 1;
        }
    }
    while let Some(r) = sreqs.pop_front() {
        until(|| tx.test(r)).unwrap();
    }
    tx.dereg_mr(smr);
}

#[test]
fn request_rules_hold_as_for_the_inner_comm() {
    let net = staged();
    let (mut tx, mut rx) = pair(&*net);
    let data = [5u8; 8];
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    // SAFETY: data is a live 8-byte array and both sends are tested to completion below.
    let s0 = unsafe { tx.isend(data.as_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: data is a live 8-byte array and both sends are tested to completion below.
    let s1 = unsafe { tx.isend(data.as_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    assert!(tx.test(s1).is_err(), "only the oldest request may be tested");
    // SAFETY: a is a live 8-byte array, read only after r0 is tested to completion below.
    let r0 = unsafe { rx.irecv(a.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: b is a live 8-byte array, read only after r1 is tested to completion below.
    let r1 = unsafe { rx.irecv(b.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    assert!(rx.irecv_consumed(r0).is_err(), "consume before completion");
    until(|| tx.test(s0)).unwrap();
    until(|| tx.test(s1)).unwrap();
    assert_eq!(until(|| rx.test(r0)).unwrap(), 8);
    assert_eq!(until(|| rx.test(r1)).unwrap(), 8);
    assert!(rx.irecv_consumed(r1).is_err(), "consume out of order");
    rx.irecv_consumed(r0).unwrap();
    rx.irecv_consumed(r1).unwrap();
    assert_eq!((a, b), (data, data));
    assert!(tx.test(RequestId(99)).is_err());
    // 16 receives outstanding (tested or not, until consumed) fill the comm.
    let mut bufs = [[0u8; 8]; 17];
    for b in bufs.iter_mut().take(16) {
        // SAFETY: each b is a live 8-byte array in bufs; nothing is sent to these receives, so nothing ever
        // writes them.
        assert!(unsafe { rx.irecv(b.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().is_some());
    }
    // SAFETY: bufs[16] is a live 8-byte array; the window is full, so the receive is refused and nothing
    // keeps the pointer.
    assert!(unsafe { rx.irecv(bufs[16].as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().is_none(), "window of 16");
}

#[test]
fn unknown_handles_and_out_of_region_posts_are_refused() {
    let net = staged();
    let (mut tx, mut rx) = pair(&*net);
    let data = [1u8; 64];
    // SAFETY: data is a live 64-byte array; the unknown handle is refused before the pointer is used.
    let err = unsafe { tx.isend(data.as_ptr(), 8, MrHandle(4242)) }.unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{err}");
    let mut buf = [0u8; 64];
    // SAFETY: buf is a live 64-byte array; the unknown handle is refused before the pointer is used.
    let err = unsafe { rx.irecv(buf.as_mut_ptr(), 8, MrHandle(7)) }.unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrInvalidParam, "{err}");
    // A refused post does not poison the comm.
    // SAFETY: data is a live 64-byte array (8 bytes sent), and the send is tested to completion below.
    let s = unsafe { tx.isend(data.as_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    // SAFETY: buf is a live 64-byte array, and the receive is tested to completion below.
    let r = unsafe { rx.irecv(buf.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    until(|| tx.test(s)).unwrap();
    assert_eq!(until(|| rx.test(r)).unwrap(), 8);
}

#[test]
fn gpu_registration_without_a_driver_is_a_clear_error() {
    if crate::cuda::available() {
        return;
    }
    let net = staged();
    let (mut tx, mut rx) = pair(&*net);
    for err in [
        tx.reg_mr(0x7f00_0000_0000, 4096, MemKind::Cuda { device: 0 }).unwrap_err(),
        rx.reg_mr(0x7f00_0000_0000, 4096, MemKind::Cuda { device: 0 }).unwrap_err(),
    ] {
        assert!(err.message().contains("cannot register GPU memory") && err.message().contains("CUDA unavailable"));
    }
}

#[test]
fn peer_failure_surfaces_through_the_decorator() {
    let net = staged();
    let (tx, mut rx) = pair(&*net);
    let mut buf = [0u8; 8];
    // SAFETY: buf is a live 8-byte array; the receive ends with the peer's disconnect below, and nothing was
    // sent.
    let r = unsafe { rx.irecv(buf.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap().unwrap();
    drop(tx);
    let err = until(|| rx.test(r)).unwrap_err();
    assert_eq!(err.status(), UcclStatus::ErrRemoteDisconnect, "{err}");
    // SAFETY: buf is a live 8-byte array; the failed comm refuses the receive before keeping the pointer.
    let again = unsafe { rx.irecv(buf.as_mut_ptr(), 8, MrHandle::NONE) }.unwrap_err();
    assert_eq!(again.status(), UcclStatus::ErrRemoteDisconnect, "a failed comm stays failed");
}

#[test]
fn vectored_host_requests_pass_through_to_the_inner_comm() {
    let net = staged();
    assert!(net.caps().vectored, "the socket transport's vectored requests survive staging");
    let (mut tx, mut rx) = pair(net.as_ref());
    let src: Vec<u8> = (0..50_000).map(|i| (i % 251) as u8).collect();
    let src2: Vec<u8> = (0..9_000).map(|i| (i % 13) as u8 + 1).collect();
    let (mut dst, mut dst2) = (vec![0u8; 60_000], vec![0u8; 8_000]);
    let smr = tx.reg_mr(src.as_ptr() as usize, src.len(), MemKind::Host).unwrap();
    let smr2 = tx.reg_mr(src2.as_ptr() as usize, src2.len(), MemKind::Host).unwrap();
    let rmr = rx.reg_mr(dst.as_mut_ptr() as usize, dst.len(), MemKind::Host).unwrap();
    let rmr2 = rx.reg_mr(dst2.as_mut_ptr() as usize, dst2.len(), MemKind::Host).unwrap();
    let seg = |addr, len| crate::transport::IoSeg { addr, len };
    let (base, base2) = (src.as_ptr() as usize, src2.as_ptr() as usize);
    // Three segments in two registrations (runs of 2 and 1) on the sender, three in two
    // registrations (runs of 1 and 2) on the receiver.
    let send = [seg(base + 40_000, 10_000), seg(base, 30_000), seg(base2 + 1_000, 8_000)];
    let send_runs = [MrRun { segs: 2, mr: smr }, MrRun { segs: 1, mr: smr2 }];
    let (dbase, dbase2) = (dst.as_mut_ptr() as usize, dst2.as_mut_ptr() as usize);
    let recv = [seg(dbase2, 6_000), seg(dbase + 100, 20_000), seg(dbase + 30_000, 22_000)];
    let recv_runs = [MrRun { segs: 1, mr: rmr2 }, MrRun { segs: 2, mr: rmr }];
    // SAFETY: refused before anything is posted.
    let uncovered = unsafe { tx.isendv(&send, &send_runs[..1]) }.unwrap_err();
    assert_eq!(uncovered.status(), UcclStatus::ErrInvalidParam, "{uncovered}");
    assert!(uncovered.message().contains("cover 2 of its 3 segments"), "{uncovered}");
    // SAFETY: the buffers outlive the requests (tested to completion below).
    let r = unsafe { rx.irecvv(&recv, &recv_runs) }.unwrap().unwrap();
    // SAFETY: as above.
    let s = unsafe { tx.isendv(&send, &send_runs) }.unwrap().unwrap();
    assert_eq!(until(|| tx.test(s)).unwrap(), 48_000);
    assert_eq!(until(|| rx.test(r)).unwrap(), 48_000);
    rx.irecv_consumed(r).unwrap();
    let sent: Vec<u8> = [&src[40_000..50_000], &src[..30_000], &src2[1_000..]].concat();
    let got: Vec<u8> = [&dst2[..6_000], &dst[100..20_100], &dst[30_000..52_000]].concat();
    assert!(got == sent);
    assert!(dst[..100].iter().chain(&dst[20_100..30_000]).chain(&dst[52_000..]).all(|&b| b == 0), "gaps untouched");
    assert!(dst2[6_000..].iter().all(|&b| b == 0));
}

/// The ring's host range is written back from the caches by the inner receive comm (with the
/// knob on), and not with the knob off.
#[test]
fn the_rings_range_is_written_back_with_the_knob_on() {
    let _alone = written_back_alone();
    let net = loopback_socket_net();
    let len = 1 << 20;
    let msg: Vec<u8> = (0..len).map(|i| (i * 13 + i / 509) as u8).collect();
    for write_back in [true, false] {
        let (mut tx, mut rx) = pair(&net);
        let mut slots = vec![0u8; len];
        let tuning = crate::config::StagingConfig { write_back, ..Default::default() };
        let mut staging =
            regions::Staging::new(setup::Setup::new(StagingParams { tuning, ..StagingParams::new(1 << 20, 4) }, 16));
        staging.register_ring_range(&mut rx, slots.as_mut_ptr() as usize, len).unwrap();
        let held = receive_counting_write_back(&mut tx, &mut rx, &msg, &mut slots);
        if write_back && writes_back() {
            assert!(held >= len as u64, "a receive into the ring's range is written back: {held}");
        } else {
            assert_eq!(held, 0, "write-back {write_back}");
        }
    }
}
