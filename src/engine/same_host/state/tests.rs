//! The same-host sub-state alone, fed the peer's messages as plain calls, with a fake network path
//! that records what the sub-state asks of it: the seam is all it sees of its connection. The
//! whole exchanges, both ends and their network fallbacks, run over the connection-state pair
//! (`conn/state/tests/direct.rs`).

use std::sync::Arc;

use super::*;
use crate::engine::region::RegionTable;
use crate::error::UcclStatus;
use crate::transport::MemKind;

/// What the sub-state asked of the connection state, in order.
#[derive(Debug, PartialEq)]
enum Asked {
    Send(String),
    HostWork(bool),
    Grant(u64, u64),
    Serve(u64, u64),
}

/// The connection state as the sub-state sees it, recording instead of acting.
#[derive(Default)]
struct FakeNet {
    asked: Vec<Asked>,
    /// The peer's read ids the channels serve.
    serving: Vec<u64>,
}

impl Network for FakeNet {
    fn send(&mut self, msg: Control) {
        let name = format!("{msg:?}");
        self.asked.push(Asked::Send(name.split([' ', '{']).next().unwrap().to_owned()));
    }

    fn finish(&mut self, _: Arc<Transfer>, _: Result<u64>) {
        panic!("no part of ours is pending in these tests");
    }

    fn host_work(&mut self, ours: bool) {
        self.asked.push(Asked::HostWork(ours));
    }

    fn collapse(&mut self, _: Arc<Region>) {}

    fn grant(&mut self, xfer: u64, extent: Extent, _: Arc<Region>) {
        self.asked.push(Asked::Grant(xfer, extent.len()));
    }

    fn serve(&mut self, xfer: u64, extent: Extent, _: Arc<Region>) -> Result<()> {
        self.asked.push(Asked::Serve(xfer, extent.len()));
        Ok(())
    }

    fn serving(&self, xfer: u64) -> bool {
        self.serving.contains(&xfer)
    }

    fn take_read(&mut self, _: u64) -> Option<Destination> {
        None
    }

    fn take_write(&mut self, _: u64) -> Option<(Arc<Transfer>, u64, Option<Error>)> {
        None
    }

    fn read_again(&mut self, _: Extent, _: Arc<Region>, _: Arc<Transfer>, _: impl FnOnce(u64) -> Control) {
        panic!("no read of ours is pending in these tests");
    }

    fn failed(&self) -> bool {
        false
    }
}

/// Registered memory of this end, advertised whole.
struct Memory {
    regions: RegionTable,
    bytes: Vec<Box<[u8]>>,
}

impl Authorize for Memory {
    fn authorize_segments(&self, region: u64, token: u64, segs: &[RemoteSeg]) -> Result<Arc<Region>> {
        self.regions.authorize_segments(region, token, segs, None)
    }
}

impl Memory {
    fn new() -> Memory {
        Memory { regions: RegionTable::default(), bytes: Vec::new() }
    }

    /// A region of `len` bytes of `kind`: its id, token and address.
    fn region(&mut self, len: usize, kind: MemKind) -> (u64, u64, u64) {
        let bytes = vec![0u8; len].into_boxed_slice();
        let addr = bytes.as_ptr() as usize;
        self.bytes.push(bytes);
        let id = self.regions.register(addr, len, kind).unwrap();
        let cap = self.regions.advertise(id, addr, len).unwrap().capability().unwrap();
        (cap.region, cap.token, addr as u64)
    }
}

/// A sub-state for a peer on this host (another process), its ProcessHello checked with
/// `reads_peer` and the peer's ProcessAck saying `peer_reads_us`.
fn proven(reads_peer: bool, peer_reads_us: bool) -> (SameHost, FakeNet) {
    let (mut sh, mut net) = (SameHost::default(), FakeNet::default());
    sh.set_same_host(None, false);
    let mem = Memory::new();
    sh.handle(Control::ProcessHello { pid: 7, fd: 3 }, &mem, &mut net).unwrap();
    assert!(matches!(sh.next_host_task(), Some(HostTask::Prove { pid: 7, fd: 3 })));
    sh.proved(reads_peer, &mut net);
    sh.handle(Control::ProcessAck { readable: peer_reads_us }, &mem, &mut net).unwrap();
    assert_eq!(net.asked, [Asked::HostWork(false), Asked::Send("ProcessAck".into())]);
    net.asked.clear();
    (sh, net)
}

#[test]
fn each_process_is_proved_once_and_a_remote_peer_never() {
    let (mut sh, _) = proven(true, true);
    let path = sh.host_path();
    assert!(path.checked && path.reads_peer && path.peer_reads_us);
    let (mem, mut net) = (Memory::new(), FakeNet::default());
    let again = sh.handle(Control::ProcessHello { pid: 7, fd: 3 }, &mem, &mut net).unwrap_err();
    assert!(again.message().contains("second ProcessHello"), "{again}");
    let again = sh.handle(Control::ProcessAck { readable: true }, &mem, &mut net).unwrap_err();
    assert!(again.message().contains("second ProcessAck"), "{again}");

    // Not on this host: the hello is answered at once with no, and a yes counts for nothing.
    let mut remote = SameHost::default();
    remote.handle(Control::ProcessHello { pid: 7, fd: 3 }, &mem, &mut net).unwrap();
    remote.handle(Control::ProcessAck { readable: true }, &mem, &mut net).unwrap();
    assert_eq!(net.asked, [Asked::Send("ProcessAck".into())]);
    assert!(!remote.has_host_task());
    assert_eq!(remote.host_path(), HostPath::default());
}

#[test]
fn a_direct_request_the_region_table_refuses_is_denied_with_nothing_queued() {
    let (mut sh, mut net) = proven(true, true);
    let mut mem = Memory::new();
    let (region, token, addr) = mem.region(1 << 20, MemKind::Host);
    let segs = vec![RemoteSeg { addr, len: 4096 }];
    let write =
        Control::DirectWrite { xfer: 1, region, token: token ^ 1, segs: segs.clone(), src: vec![0x1000], huge: false };
    sh.handle(write, &mem, &mut net).unwrap();
    let read = Control::DirectRead { xfer: 2, region, token: token ^ 1, segs };
    sh.handle(read, &mem, &mut net).unwrap();
    assert_eq!(net.asked, [Asked::Send("Deny".into()), Asked::Send("Deny".into())]);
    assert!(!sh.has_host_task() && sh.leases() == 0);
}

#[test]
fn an_authorized_direct_request_is_copied_here_or_leased_to_the_peer() {
    let (mut sh, mut net) = proven(true, true);
    let mut mem = Memory::new();
    let (region, token, addr) = mem.region(1 << 20, MemKind::Host);
    let segs = vec![RemoteSeg { addr, len: 4096 }, RemoteSeg { addr: addr + 8192, len: 4096 }];
    let write =
        Control::DirectWrite { xfer: 1, region, token, segs: segs.clone(), src: vec![0x1000, 0x9000], huge: true };
    sh.handle(write, &mem, &mut net).unwrap();
    let Some(HostTask::Copy(job)) = sh.queued().front() else { panic!("the peer's write is queued for a copy") };
    assert_eq!((job.op, job.len, job.remote_huge, job.remote.len()), (1, 8192, true, 2));
    sh.handle(Control::DirectRead { xfer: 2, region, token, segs }, &mem, &mut net).unwrap();
    assert_eq!(sh.leases(), 1, "the peer's read holds a lease until its DirectDone");
    sh.handle(Control::DirectDone { xfer: 2 }, &mem, &mut net).unwrap();
    assert_eq!(sh.leases(), 0);
    assert_eq!(
        net.asked,
        [Asked::HostWork(false), Asked::Send("DirectGrant".into()), Asked::Send("Done".into())],
        "the write waits for the worker; the read is granted, then vouched for"
    );
    let late = sh.handle(Control::DirectDone { xfer: 2 }, &mem, &mut net).unwrap_err();
    assert!(late.message().contains("unknown id 2"), "{late}");
}

#[test]
fn what_the_cpu_cannot_copy_falls_back_to_the_network_path() {
    // We cannot read the peer: its write is granted as a network write.
    let (mut sh, mut net) = proven(false, true);
    let mut mem = Memory::new();
    let (region, token, addr) = mem.region(1 << 20, MemKind::Host);
    let one = vec![RemoteSeg { addr, len: 4096 }];
    let write = Control::DirectWrite { xfer: 1, region, token, segs: one.clone(), src: vec![0x1000], huge: false };
    sh.handle(write, &mem, &mut net).unwrap();
    // The peer cannot read us: its read is served over the channels.
    let (mut reader_blind, mut net2) = proven(true, false);
    reader_blind.handle(Control::DirectRead { xfer: 2, region, token, segs: one.clone() }, &mem, &mut net2).unwrap();
    // Device memory is out of the CPU's reach either way.
    let (mut sh3, mut net3) = proven(true, true);
    let (gpu_region, gpu_token, gpu_addr) = mem.region(1 << 20, MemKind::Cuda { device: 0 });
    let gpu = vec![RemoteSeg { addr: gpu_addr, len: 8192 }];
    let write = Control::DirectWrite {
        xfer: 3,
        region: gpu_region,
        token: gpu_token,
        segs: gpu.clone(),
        src: vec![0x1000],
        huge: false,
    };
    sh3.handle(write, &mem, &mut net3).unwrap();
    sh3.handle(Control::DirectRead { xfer: 4, region: gpu_region, token: gpu_token, segs: gpu }, &mem, &mut net3)
        .unwrap();
    assert_eq!(net.asked, [Asked::Grant(1, 4096)]);
    assert_eq!(net2.asked, [Asked::Serve(2, 4096)]);
    assert_eq!(net3.asked, [Asked::Grant(3, 8192), Asked::Serve(4, 8192)]);
    assert!(!sh.has_host_task() && !sh3.has_host_task() && reader_blind.leases() == 0 && sh3.leases() == 0);
}

#[test]
fn a_peer_breaking_the_same_host_protocol_fails_the_connection() {
    let (mut sh, mut net) = proven(true, true);
    let mut mem = Memory::new();
    let (region, token, addr) = mem.region(1 << 20, MemKind::Host);
    let segs = vec![RemoteSeg { addr, len: 4096 }];
    // A read id the channels serve already.
    net.serving.push(5);
    let reused = sh.handle(Control::DirectRead { xfer: 5, region, token, segs }, &mem, &mut net).unwrap_err();
    assert!(reused.message().contains("reuses op id 5"), "{reused}");
    // A grant for a read we never asked for.
    let unasked = sh.handle(Control::DirectGrant { xfer: 9, huge: false }, &mem, &mut net).unwrap_err();
    assert!(unasked.message().contains("unknown id 9"), "{unasked}");
    // A grant while we told the peer we cannot copy out of it.
    let (mut blind, mut net2) = proven(false, true);
    let refused = blind.handle(Control::DirectGrant { xfer: 9, huge: false }, &mem, &mut net2).unwrap_err();
    assert!(refused.message().contains("never said we can copy"), "{refused}");
    // A network message is no business of the sub-state.
    let stray = sh.handle(Control::Close, &mem, &mut net).unwrap_err();
    assert_eq!(stray.status(), UcclStatus::ErrBackend);
    assert!(net.asked.is_empty() && net2.asked.is_empty());
}
