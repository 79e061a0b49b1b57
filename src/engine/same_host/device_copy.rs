//! One-sided transfers that touch GPU memory between engines of one host, with no byte on a socket:
//! the initiator copies with `cuMemcpyAsync` / `cuMemcpyPeerAsync` on a stream of its own, all
//! copies of a call back to back and one event behind them, and the parts finish when the event
//! fired (the progress thread or a caller's poll looks, a caller's wait blocks on it).
//!
//! - Between engines of this process (`Locality::SameProcess`) nothing needs mapping: the target's
//!   region table authorizes every request under both connections' locks, as `local_copy` does for
//!   host memory, and the copy names the target's addresses directly.
//! - Between processes (`Locality::SameHost`) the initiator asks the owner once per region and
//!   token (IpcRequest). The owner authorizes it like a vector request and answers with the CUDA
//!   IPC handle of the region's allocation and the windows advertised for it (IpcGrant), or with
//!   NOT_SUPPORTED when there is no handle (host memory, the virtual memory API), after which that
//!   region's requests take the network path. The initiator maps the allocation once per GPU and
//!   handle (`cuda::ipc::Mapping`) and copies every later request inside those windows without a
//!   round trip; a request outside them asks again.
//!
//! Deregistration is a fence across both: the owner revokes its grants on every connection that
//! holds one (IpcRevoke) and waits for the answer (IpcRevoked), which the initiator sends once none
//! of its copies into or out of the region is in flight; copies that touch a region of this process
//! are counted on the region, and the deregistration waits for the count to fall to zero.

use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashSet as HashSet;

use super::ipc::{ASK_BIT, Answer, Coverage, GrantKey, Hold, IpcState, NotIssued};
use super::seam::{Conn, Locked};
use super::{Locality, peer_connection};
use crate::config::LocalPeers;
use crate::cuda::Gpu;
use crate::cuda::device_copy::{CopyQueue, DeviceCopy, kernel_takes, kernel_takes_listed};
use crate::cuda::ipc::Mapping;
use crate::cuda::stream::Event;
use crate::cuda::unpack::addressable;
use crate::engine::one_sided::{CheckedPieces, OneSidedRequest};
use crate::engine::path;
use crate::engine::plan::Extent;
use crate::engine::region::Region;
use crate::engine::transfer::Transfer;
use crate::error::{Error, Result, UcclStatus};
use crate::proto::{Control, FifoItem, IPC_HANDLE_LEN, RemoteSeg};
use crate::trace::{self, DevicePost as Post, SeenBy as Seer, clock_ns};
use crate::transport::MemKind;

/// Asks for one request before it is refused: a grant revoked between its answer and the copy
/// (the owner deregistered the region meanwhile) makes the caller ask again, and the owner refuses
/// a region it no longer has.
const MAX_ASKS: usize = 3;

/// Calls of at least this many copies, averaging at most [`ONE_BY_ONE_MAX_AVERAGE`] bytes, take
/// the network path wherever the device path would copy them one by one (the kernel does not take
/// them: `kernel_takes`): a copy costs the poster about 4 us, so 1024 pieces of 16 KiB took 4 ms
/// (3-4 GB/s) on an H100, against 7-11 GB/s over the staged network path with the kernel disabled
/// for the device path only (docs/perf-log/vectors.md). Without NVRTC the staging ring copies
/// segment by segment as well (0.28-0.30 of one piece on the 2 x H200 host, several GB/s; not
/// measured against this path). Fewer or larger pieces stay: 64 of 256 KiB posted in about 0.3 ms.
const ONE_BY_ONE_MIN_PIECES: usize = 64;
const ONE_BY_ONE_MAX_AVERAGE: u64 = 32 << 10;

/// Whether `plan`'s copies would go one by one, and are too many and too small for that: the
/// network path carries the call instead. The kernel's answer, where asked, stays with the plan
/// for its queue.
fn too_costly_one_by_one(plan: &mut Plan) -> bool {
    let copies = &plan.copies;
    let bytes: u64 = copies.iter().map(|c| c.len as u64).sum();
    if copies.len() < ONE_BY_ONE_MIN_PIECES || bytes > (copies.len() as u64).saturating_mul(ONE_BY_ONE_MAX_AVERAGE) {
        return false;
    }
    let takes = kernel_takes(plan.gpu.ordinal(), copies);
    plan.kernel = Some(takes);
    !takes
}

/// How an ask ended.
pub(crate) enum Asked {
    /// Granted and mapped: look the grant up again.
    Granted,
    /// No IPC path for the region: the network path carries the call.
    Unavailable,
    /// The owner refused the request (not authorized): its part fails with this.
    Refused(Error),
}

/// What a capability's grant came to (`cover`).
pub(crate) enum Cover {
    /// Mapped and covering the segments, at this generation of the grant table.
    Covered(u64),
    /// No IPC path for the region: the network path carries its transfers.
    Unavailable,
    /// The owner refused (not authorized).
    Refused(Error),
    /// Granted every time it was asked and gone again before it was looked up (the owner
    /// deregistering the region meanwhile).
    Revoked,
}

/// The copies of one call that go to one GPU's queue, and what they finish.
pub(crate) struct Plan {
    gpu: Arc<Gpu>,
    copies: Vec<DeviceCopy>,
    parts: Vec<u64>,
    regions: Vec<Arc<Region>>,
    remote_regions: Vec<u64>,
    mappings: Vec<Mapping>,
    /// Whether the kernel takes `copies`, where `too_costly_one_by_one` asked.
    kernel: Option<bool>,
    /// What `regions`, `remote_regions` and `mappings` hold, by address or id: a call of
    /// thousands of requests over 160 regions looks each one up in a probe, not a walk.
    held: HashSet<(u8, u64)>,
}

impl Plan {
    fn new(gpu: Arc<Gpu>) -> Plan {
        Plan {
            gpu,
            kernel: None,
            copies: Vec::new(),
            parts: Vec::new(),
            regions: Vec::new(),
            remote_regions: Vec::new(),
            mappings: Vec::new(),
            held: HashSet::default(),
        }
    }

    /// Counts `region` once for this batch.
    fn touch(&mut self, region: &Arc<Region>) {
        if self.held.insert((0, Arc::as_ptr(region) as u64)) {
            self.regions.push(region.clone());
        }
    }

    /// Holds the owner's region `id` and the mapping it is copied through once for this batch.
    fn touch_remote(&mut self, id: u64, mapping: &Mapping) {
        if self.held.insert((1, id)) {
            self.remote_regions.push(id);
        }
        if self.held.insert((2, mapping.ptr())) {
            self.mappings.push(mapping.clone());
        }
    }
}

/// A request of a cross-process call, decided: its pieces' remote addresses plus `offset` are
/// their mapped addresses here.
pub(crate) struct Route<'a> {
    request: &'a OneSidedRequest,
    offset: u64,
    /// Its local end is memory of the issuing GPU.
    local_here: bool,
    /// The piece kernel addresses both its ends.
    kernel: bool,
}

/// How many pieces `pieces` yields for the request.
fn request_pieces(request: &OneSidedRequest) -> usize {
    match request {
        OneSidedRequest::Item(_) => 1,
        OneSidedRequest::Vector(v) => v.segs.len(),
    }
}

/// The bytes the request moves.
fn request_bytes(request: &OneSidedRequest) -> u64 {
    match request {
        OneSidedRequest::Item(i) => i.len,
        OneSidedRequest::Vector(v) => v.local.len(),
    }
}

fn grant_key(request: &OneSidedRequest) -> GrantKey {
    match request {
        OneSidedRequest::Item(item) => (item.remote_region, item.token),
        OneSidedRequest::Vector(vector) => (vector.remote_region, vector.token),
    }
}

/// `f` of the request's remote segments: a vector's own list, an item's one segment on the stack.
fn with_remote_segs<R>(request: &OneSidedRequest, f: impl FnOnce(&[RemoteSeg]) -> R) -> R {
    match request {
        // The length was checked against the u32 size of its FifoItem.
        OneSidedRequest::Item(item) => f(&[RemoteSeg { addr: item.remote_addr, len: item.len as u32 }]),
        OneSidedRequest::Vector(vector) => f(&vector.segs),
    }
}

/// `(local address, remote address, len)` for every piece of the request, in order, read off its
/// lists as they are (a vector's pieces are walked under the connection's lock on every call).
fn pieces(request: &OneSidedRequest) -> impl Iterator<Item = (usize, u64, usize)> + '_ {
    let (item, scattered, run) = match request {
        OneSidedRequest::Item(i) => (Some((i.addr, i.remote_addr, i.len as usize)), None, None),
        OneSidedRequest::Vector(v) => match &v.local {
            Extent::Scattered { segs, .. } => (None, Some(segs.iter().zip(&v.segs)), None),
            // One local run against the remote segments in order.
            Extent::Contiguous { addr, .. } => (None, None, Some((*addr, &v.segs))),
        },
    };
    let scattered = scattered.into_iter().flatten().map(|(l, r)| (l.addr, r.addr, r.len as usize));
    let run = run.into_iter().flat_map(|(addr, segs)| {
        segs.iter().scan(addr, |at, r| {
            let piece = (*at, r.addr, r.len as usize);
            *at += r.len as usize;
            Some(piece)
        })
    });
    item.into_iter().chain(scattered).chain(run)
}

fn device_of(region: &Region) -> Option<i32> {
    match region.kind {
        MemKind::Cuda { device } => Some(device),
        MemKind::Host => None,
    }
}

fn unanswered(key: GrantKey, timeout: std::time::Duration) -> Error {
    Error::timeout(format!(
        "the owner of memory region {} did not answer an IPC request within {} ms (UCCL_TCPX_TIMEOUT_MS)",
        key.0,
        timeout.as_millis()
    ))
}

fn deregistered(region: u64) -> Error {
    Error::not_allowed(format!("memory region {region} was deregistered during the transfer"))
}

fn deny_msg(xfer: u64, e: &Error) -> Control {
    Control::Deny { xfer, status: e.status() as i32, reason: e.message().to_owned() }
}

/// Plans a cross-process call under the connection's lock, held until its copies are queued:
/// every request is decided here, its grant covering its pieces, so each is mapped at its address
/// plus the grant's offset. Planned before the transfer exists, so that a call the network must
/// carry leaves nothing behind; the parts that fail wait for that choice too.
///
/// Without `asked` (no grant asked for yet), `None` as soon as a request's grant is missing or does
/// not cover it. With it (each request's refusal by its owner, if any, and the grant table's
/// generation when the first grant was found covering), a grant missing now was revoked since
/// (the owner deregistered the region meanwhile), and its request fails.
fn plan_mapped<'a>(
    ipc: &mut IpcState,
    requests: &'a [OneSidedRequest],
    gpu: Arc<Gpu>,
    asked: Option<(Vec<Option<Error>>, Option<u64>)>,
) -> Option<(Plan, Vec<Route<'a>>, Vec<Error>)> {
    let mut failed: Vec<Error> = Vec::new();
    let mut plan = Plan::new(gpu);
    let here = plan.gpu.ordinal();
    let mut routes: Vec<Route> = Vec::with_capacity(requests.len());
    let unchanged = asked.as_ref().is_some_and(|(_, at)| *at == Some(ipc.generation()));
    let strict = asked.is_none();
    let mut refusals = asked.map(|(refused, _)| refused.into_iter());
    for request in requests {
        let local = request.local_region();
        let key = grant_key(request);
        if let Some(e) = refusals.as_mut().and_then(|r| r.next().flatten()) {
            failed.push(e);
            continue;
        }
        if local.is_removed() {
            failed.push(deregistered(local.id));
            continue;
        }
        let grant = ipc.mapped(key).filter(|g| unchanged || with_remote_segs(request, |segs| g.covers(segs)));
        let Some(grant) = grant else {
            if strict {
                return None;
            }
            // Revoked since it was looked up (the owner deregistered the region), or a piece
            // outside its windows.
            failed.push(deregistered(key.0));
            continue;
        };
        // The mapping lives in the issuing GPU's context, opened with peer access wherever the
        // owner's allocation is: the issuing GPU's kernels address it. The local end is theirs
        // where it is that GPU's memory.
        let local_here = device_of(local) == Some(here);
        let kernel = local_here && addressable(local.base as u64, local.len as u64) && grant.mapped_within(addressable);
        routes.push(Route { request, offset: grant.offset(), local_here, kernel });
        plan.parts.push(request_bytes(request));
        plan.touch(local);
        plan.touch_remote(key.0, grant.mapping);
    }
    Some((plan, routes, failed))
}

/// The same-host GPU path of a connection (`seam::Conn`): the connection calls
/// `try_device_one_sided`, `handle_ipc`, `wait_device_copies` and `drive_device_copies`; the other
/// methods are their steps.
pub(crate) trait DevicePath: Conn {
    /// `None` when the call takes another path: the peer is remote, no GPU memory is involved, the
    /// owner's region has no IPC path (then the network carries the whole call), the call has many
    /// small pieces the kernel does not take (`too_costly_one_by_one`), or
    /// UCCL_TCPX_LOCAL_PEERS=plugin keeps same-host peers on the net plugin (for tests of that path).
    /// `posted`: when the call began, while its stages are traced.
    fn try_device_one_sided(
        &self,
        requests: &[OneSidedRequest],
        write: bool,
        posted: Option<u64>,
    ) -> Option<Result<u64>> {
        if self.core().config.local_peers == LocalPeers::Plugin {
            return None;
        }
        let post = posted.map(|at| Post { at, ..Post::default() });
        match self.link().locality {
            Locality::Remote => None,
            Locality::SameProcess => self.same_process_device(requests, write, post),
            Locality::SameHost => self.cross_process_device(requests, write, post),
        }
    }

    /// The checked runs of a pieces call (`Connection::write_pieces`) to a peer process of this
    /// host, copied by the piece kernel straight from the runs in one pass under the lock (its
    /// first launch while the rest is still listed): `None` unless that is the whole call's path
    /// with nothing to ask or decide per piece (every local region on the engine's GPU, every
    /// run's capability inside a mapped grant, the kernel built and taking the pieces), which
    /// `try_device_one_sided` then decides request by request.
    fn try_device_pieces(&self, runs: &[CheckedPieces<'_>], write: bool, posted: Option<u64>) -> Option<Result<u64>> {
        if !path::same_host_gpu(self.link().locality, self.core().config.local_peers) {
            return None;
        }
        let gpu = self.core().gpu.get()?.clone();
        let here = gpu.ordinal();
        let listed: usize = runs.iter().map(|r| r.pieces.len()).sum();
        let bytes = runs.iter().fold(0u64, |b, r| b.saturating_add(r.bytes));
        let kernel = kernel_takes_listed(here, listed, bytes)
            && runs
                .iter()
                .all(|r| device_of(&r.region) == Some(here) && addressable(r.region.base as u64, r.region.len as u64));
        if !kernel {
            return None;
        }
        let mut guard = self.lock();
        if let Err(e) = guard.check_open() {
            return Some(Err(e));
        }
        let ipc = guard.ipc();
        let mut plan = Plan::new(gpu);
        let mut offsets = Vec::with_capacity(runs.len());
        for run in runs {
            let key = (run.remote_region, run.token);
            // A run inside its capability is inside the grant wherever the capability's range is.
            // A region removed since the check fails its part on the general path.
            let grant = ipc
                .mapped(key)
                .filter(|g| g.covers(std::slice::from_ref(&run.granted)) && g.mapped_within(addressable))
                .filter(|_| !run.region.is_removed())?;
            offsets.push(grant.offset());
            plan.parts.push(run.bytes);
            plan.touch(&run.region);
            plan.touch_remote(key.0, grant.mapping);
        }
        let transfer = self.new_transfer(runs.len(), write);
        let copies = runs.iter().zip(offsets).flat_map(|(run, offset)| {
            run.pieces.iter().map(move |p| {
                let mapped = p.remote.wrapping_add(offset);
                if write { (p.local, mapped, p.len) } else { (mapped, p.local, p.len) }
            })
        });
        // SAFETY: every local range lies in a live registration of this engine on the issuing GPU
        // (checked at the call, not removed, under this connection's lock, counted by the plan);
        // every remote one inside its run's capability, inside a window of the owner's grant mapped
        // into that GPU's context (under the same lock, held by the plan); both addressable by the
        // kernel.
        let issued = unsafe { self.issue_pieces(ipc, &transfer, plan, copies) };
        self.trace_issued(
            posted.map(|at| Post { at, ..Post::default() }),
            transfer.id,
            write,
            bytes,
            u64::from(issued),
        );
        Some(Ok(transfer.id))
    }

    fn same_process_device(
        &self,
        requests: &[OneSidedRequest],
        write: bool,
        post: Option<Post>,
    ) -> Option<Result<u64>> {
        let peer = peer_connection::<Self>(self.link())?;
        let (mut ours, theirs) = self.lock_with_peer(&peer);
        if let Err(e) = ours.check_open() {
            return Some(Err(e));
        }
        if theirs.failure().is_some() {
            return None;
        }
        let binding = peer.binding();
        let decided: Vec<Result<Arc<Region>>> = requests
            .iter()
            .map(|request| match request {
                OneSidedRequest::Item(i) => {
                    peer.core().regions.authorize(i.remote_region, i.token, i.remote_addr, i.len, binding)
                }
                OneSidedRequest::Vector(v) => {
                    peer.core().regions.authorize_segments(v.remote_region, v.token, &v.segs, binding)
                }
            })
            .collect();
        let all_host = requests.iter().zip(&decided).all(|(request, decision)| {
            request.local_region().kind == MemKind::Host && decision.as_ref().is_ok_and(|t| t.kind == MemKind::Host)
        });
        if all_host {
            return None;
        }
        // Planned before the transfer exists, so that a call the network must carry leaves nothing
        // behind; the parts that fail, and the host copies, wait for that choice too.
        let mut failed: Vec<Error> = Vec::new();
        let mut on_cpu: Vec<&OneSidedRequest> = Vec::new();
        let mut plans: Vec<Plan> = Vec::new();
        for (request, decision) in requests.iter().zip(decided) {
            let local = request.local_region();
            let target = match decision {
                Ok(target) if local.is_removed() || target.is_removed() => {
                    failed.push(deregistered(if local.is_removed() { local.id } else { target.id }));
                    continue;
                }
                Ok(target) => target,
                Err(e) => {
                    failed.push(e);
                    continue;
                }
            };
            let (local_gpu, target_gpu) = (device_of(local), device_of(&target));
            let Some(issuer) = local_gpu.or(target_gpu) else {
                on_cpu.push(request);
                continue;
            };
            let at = match plans.iter().position(|p| p.gpu.ordinal() == issuer) {
                Some(at) => at,
                None => match Gpu::open(issuer) {
                    Ok(gpu) => {
                        plans.push(Plan::new(gpu));
                        plans.len() - 1
                    }
                    Err(e) => {
                        failed.push(e);
                        continue;
                    }
                },
            };
            let plan = &mut plans[at];
            let mut bytes = 0u64;
            for (l, r, len) in pieces(request) {
                let (l, r) = (l as u64, r);
                plan.copies.push(if write {
                    DeviceCopy { dst: r, dst_gpu: target_gpu, src: l, src_gpu: local_gpu, len }
                } else {
                    DeviceCopy { dst: l, dst_gpu: local_gpu, src: r, src_gpu: target_gpu, len }
                });
                bytes += len as u64;
            }
            plan.parts.push(bytes);
            plan.touch(local);
            plan.touch(&target);
        }
        if plans.iter_mut().any(too_costly_one_by_one) {
            return None;
        }
        let transfer = self.new_transfer(requests.len(), write);
        for e in failed {
            transfer.finish_part(Err(e));
        }
        for request in on_cpu {
            // Host memory at both ends: a CPU copy, as `local_copy` makes them.
            let mut moved = 0u64;
            for (l, r, len) in pieces(request) {
                let (src, dst) = if write { (l, r as usize) } else { (r as usize, l) };
                // SAFETY: both ranges lie in live registrations (the local one checked at post, the
                // remote one authorized above), neither removable while both locks are held; one
                // process may name overlapping ranges, hence a move.
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
                moved += len as u64;
            }
            transfer.finish_part(Ok(moved));
        }
        let (mut batches, mut bytes) = (0, 0);
        for plan in plans {
            let planned = plan.parts.iter().sum::<u64>();
            if self.issue(ours.ipc(), &transfer, plan) {
                (batches, bytes) = (batches + 1, bytes + planned);
            }
        }
        self.trace_issued(post, transfer.id, write, bytes, batches);
        drop((ours, theirs));
        Some(Ok(transfer.id))
    }

    fn cross_process_device(
        &self,
        requests: &[OneSidedRequest],
        write: bool,
        mut post: Option<Post>,
    ) -> Option<Result<u64>> {
        if requests.iter().any(|r| device_of(r.local_region()).is_none()) {
            return None;
        }
        let gpu = self.core().gpu.get()?.clone();
        // The steady case first: every request's grant mapped and covering it, found in the pass
        // that plans the call, under one hold of the lock (a lock and two lookups a request made
        // a call of 8,192 single blocks over 64 regions spend about 1 ms before its launch).
        // Otherwise every request's grant is made to cover it (`cover`: an ask and a mapping per
        // region at most, without the lock held), and the plan looks again.
        let mut asked: Option<(Vec<Option<Error>>, Option<u64>)> = None;
        let (mut guard, mut plan, routes, failed) = loop {
            if let Some((refused, _)) = &mut asked {
                // The grant table's generation when the first request was found covered: if it did
                // not move until the plan below, every coverage found meanwhile still holds there.
                let mut covered_at = None;
                for request in requests {
                    let key = grant_key(request);
                    match with_remote_segs(request, |segs| self.cover(key, segs, &gpu, &mut post)) {
                        Ok(Cover::Covered(generation)) => {
                            covered_at.get_or_insert(generation);
                            refused.push(None);
                        }
                        Ok(Cover::Unavailable) => return None,
                        Ok(Cover::Refused(e)) => refused.push(Some(e)),
                        // Asked again and again, granted each time and revoked before it was used:
                        // the plan below finds it unmapped and fails the request.
                        Ok(Cover::Revoked) => refused.push(None),
                        Err(e) => return Some(Err(e)),
                    }
                }
                asked.as_mut().expect("asked").1 = covered_at;
            }
            let mut guard = self.lock();
            if let Err(e) = guard.check_open() {
                return Some(Err(e));
            }
            match plan_mapped(guard.ipc(), requests, gpu.clone(), asked.take()) {
                Some((plan, routes, failed)) => break (guard, plan, routes, failed),
                None => asked = Some((Vec::with_capacity(requests.len()), None)),
            }
        };
        let inner = &mut guard;
        let here = plan.gpu.ordinal();
        let listed: usize = routes.iter().map(|r| request_pieces(r.request)).sum();
        let bytes = plan.parts.iter().sum::<u64>();
        // Many small pieces on the issuing GPU go through the piece kernel, listed as they are
        // walked; the rest one copy each, unless too many and too small for that.
        let kernel = routes.iter().all(|r| r.kernel) && kernel_takes_listed(here, listed, bytes);
        if !kernel {
            let ours = Some(here);
            for route in &routes {
                let ours = ours.filter(|_| route.local_here);
                plan.copies.extend(pieces(route.request).map(|(l, r, len)| {
                    let (l, mapped) = (l as u64, r.wrapping_add(route.offset));
                    if write {
                        DeviceCopy { dst: mapped, dst_gpu: Some(here), src: l, src_gpu: ours, len }
                    } else {
                        DeviceCopy { dst: l, dst_gpu: ours, src: mapped, src_gpu: Some(here), len }
                    }
                }));
            }
            if too_costly_one_by_one(&mut plan) {
                return None;
            }
        }
        let transfer = self.new_transfer(requests.len(), write);
        for e in failed {
            transfer.finish_part(Err(e));
        }
        let issued = if kernel {
            let copies = routes.iter().flat_map(|route| {
                pieces(route.request).map(move |(l, r, len)| {
                    let (l, mapped) = (l as u64, r.wrapping_add(route.offset));
                    if write { (l, mapped, len as u64) } else { (mapped, l, len as u64) }
                })
            });
            // SAFETY: every local range lies in a live registration of this engine on the issuing
            // GPU (checked at post and not removed, under this connection's lock); every remote one
            // in a window of an owner's grant mapped into that GPU's context (covered, under the
            // same lock); both addressable by the kernel (their region and windows are). The plan
            // counts the regions and holds the mappings.
            unsafe { self.issue_pieces(inner.ipc(), &transfer, plan, copies) }
        } else {
            self.issue(inner.ipc(), &transfer, plan)
        };
        self.trace_issued(post, transfer.id, write, bytes, u64::from(issued));
        Some(Ok(transfer.id))
    }

    /// Makes sure the grant of `key` covers `segs` and is mapped into `gpu`'s context, asking the
    /// owner (and mapping what it grants) at most [`MAX_ASKS`] times; `post` counts the asks while
    /// the call is traced. While another caller asks for the same grant this one waits for that
    /// ask and looks again, so that callers racing for a region (a transfer beside `prepare`)
    /// make one round trip and one mapping between them.
    fn cover(&self, key: GrantKey, segs: &[RemoteSeg], gpu: &Arc<Gpu>, post: &mut Option<Post>) -> Result<Cover> {
        // Read only when a caller has to wait: a covered grant, the common case, needs no clock.
        let mut deadline = None;
        for _ in 0..MAX_ASKS {
            let mut locked = self.lock();
            loop {
                let ipc = locked.ipc();
                match ipc.coverage(key, segs) {
                    Coverage::Covered => return Ok(Cover::Covered(ipc.generation())),
                    Coverage::Unavailable => return Ok(Cover::Unavailable),
                    Coverage::Missing if !ipc.asking(key) => break,
                    Coverage::Missing => {}
                }
                if let Some(e) = locked.failure() {
                    return Err(e);
                }
                let timeout = self.core().config.timeout;
                if self.wait_answered(&mut locked, *deadline.get_or_insert_with(|| Instant::now() + timeout)) {
                    return Err(unanswered(key, timeout));
                }
            }
            // Marked under the lock that found no ask under way, so that no other caller starts one.
            locked.ipc().ask_for(key);
            drop(locked);
            let asked_at = post.map(|_| clock_ns());
            let asked = self.ask(key, segs, gpu);
            self.lock().ipc().asked_for(key);
            self.answered();
            if let (Some(post), Some(at)) = (post.as_mut(), asked_at) {
                post.asks += 1;
                post.ask_ns += clock_ns().saturating_sub(at);
            }
            match asked? {
                Asked::Granted => continue,
                Asked::Unavailable => return Ok(Cover::Unavailable),
                Asked::Refused(e) => return Ok(Cover::Refused(e)),
            }
        }
        Ok(Cover::Revoked)
    }

    /// What a first transfer into `remote` would ask the owner and map (`cover`), done now: the
    /// capability's whole window, whose grant covers every window the owner advertised for the
    /// region. Whether a mapping now serves it; false where none would (a peer of another host or
    /// of this process, an engine without a GPU, memory without a CUDA IPC handle, the plugin
    /// keeping same-host peers).
    fn prepare_device(&self, remote: &FifoItem) -> Result<bool> {
        let cap = remote.capability().map_err(|e| Error::invalid(format!("not a capability of this engine: {e}")))?;
        // Only a peer process's memory needs mapping; within this process its addresses serve.
        let locality = self.link().locality;
        if locality != Locality::SameHost || !path::same_host_gpu(locality, self.core().config.local_peers) {
            return Ok(false);
        }
        let Some(gpu) = self.core().gpu.get().cloned() else { return Ok(false) };
        let segs = [RemoteSeg { addr: remote.addr, len: remote.size }];
        match self.cover((cap.region, cap.token), &segs, &gpu, &mut None)? {
            Cover::Covered(_) => Ok(true),
            Cover::Unavailable => Ok(false),
            Cover::Refused(e) => Err(e),
            Cover::Revoked => Err(deregistered(cap.region)),
        }
    }

    /// Queues `copies` (source, destination, length) through the piece kernel as they are walked,
    /// each full list launched at once, then one event behind them, and records the batch; a
    /// failure to queue fails its parts once the copies queued before it finished. Whether a batch
    /// is now in flight.
    ///
    /// # Safety
    /// Every range is device memory that the plan's GPU's kernels address, in a region or mapped
    /// window that `plan` counts or holds, reserved to its copy until the batch's event fired.
    unsafe fn issue_pieces(
        &self,
        ipc: &mut IpcState,
        transfer: &Arc<Transfer>,
        plan: Plan,
        mut copies: impl Iterator<Item = (u64, u64, u64)>,
    ) -> bool {
        let gpu = plan.gpu.clone();
        self.issue_with(ipc, transfer, plan, |q| {
            let Some(mut call) = q.piece_call()? else {
                return Err(Error::backend(format!("the piece kernel of {gpu:?} is not built")));
            };
            // SAFETY: the caller's contract; a failure waits for what was launched.
            copies.try_for_each(|(src, dst, len)| unsafe { call.push(src, dst, len) })?;
            call.end()
        })
    }

    /// Records a traced call's issue.
    fn trace_issued(&self, post: Option<Post>, transfer: u64, write: bool, bytes: u64, batches: u64) {
        if let Some(post) = post {
            trace::event!(DeviceIssued {
                conn: self.trace().conn,
                side: self.trace().side,
                transfer,
                write: u64::from(write),
                bytes,
                batches,
                entered: post.at,
                asks: u64::from(post.asks),
                ask_ns: post.ask_ns
            });
        }
    }

    /// Queues a plan's copies behind one event and records the batch; a failure to queue fails its
    /// parts (after the copies queued before it finished). Whether a batch is now in flight.
    fn issue(&self, ipc: &mut IpcState, transfer: &Arc<Transfer>, mut plan: Plan) -> bool {
        let (copies, kernel) = (std::mem::take(&mut plan.copies), plan.kernel);
        // SAFETY: every local range lies in a live registration of this engine (checked at post and
        // not removed, under this connection's lock); every remote one either lies in a window the
        // owner in this process authorized (its region not removed, under the owner's connection
        // lock) or in a mapped window of an owner's grant. The regions stay counted, and the
        // mappings held, until the batch's event fired.
        self.issue_with(ipc, transfer, plan, |q| unsafe { q.issue_known(&copies, kernel) })
    }

    /// Records `plan`'s batch, its copies queued by `queue_copies`; a failure fails its parts.
    /// Whether a batch is now in flight.
    fn issue_with(
        &self,
        ipc: &mut IpcState,
        transfer: &Arc<Transfer>,
        plan: Plan,
        queue_copies: impl FnOnce(&mut CopyQueue) -> Result<Event>,
    ) -> bool {
        if plan.parts.is_empty() {
            return false;
        }
        let Plan { gpu, parts, regions, remote_regions, mappings, .. } = plan;
        let n = parts.len();
        let hold = Hold {
            transfer: transfer.clone(),
            parts,
            regions,
            counted: Vec::new(),
            remote_regions,
            mappings,
            answer: None,
        };
        match ipc.issue(&gpu, hold, &self.core().waker, queue_copies) {
            Ok(()) => true,
            Err(NotIssued::NoQueue(e) | NotIssued::Failed(e)) => {
                for _ in 0..n {
                    transfer.finish_part(Err(e.clone()));
                }
                false
            }
        }
    }

    /// Asks the owner for a grant covering `segs` of `key` and maps what it grants. Blocks for
    /// the owner's answer (one round trip, once per region and token), at most the stall timeout.
    fn ask(&self, key: GrantKey, segs: &[RemoteSeg], gpu: &Arc<Gpu>) -> Result<Asked> {
        let asked = trace::on(trace::DEVICE).then(clock_ns);
        let id = {
            let mut inner = self.lock();
            inner.check_open()?;
            let id = inner.ipc().new_ask(key);
            let request = Control::IpcRequest { xfer: id, region: key.0, token: key.1, segs: segs.to_vec() };
            if let Err(e) = self.send(&request) {
                inner.ipc().forget_ask(id);
                return Err(e);
            }
            id
        };
        let deadline = Instant::now() + self.core().config.timeout;
        let mut inner = self.lock();
        let answer = loop {
            if let Some(answer) = inner.ipc().take_answer(id) {
                break answer;
            }
            if let Some(e) = inner.failure() {
                return Err(e);
            }
            if self.wait_answered(&mut inner, deadline) {
                inner.ipc().forget_ask(id);
                return Err(unanswered(key, self.core().config.timeout));
            }
        };
        let asked = asked.map(|at| (at, clock_ns()));
        let traced = |granted: bool| {
            if let Some((asked, answered)) = asked {
                let (conn, side) = (self.trace().conn, self.trace().side);
                let (region, granted) = (key.0, u64::from(granted));
                trace::event!(DeviceAsked { conn, side, region, asked, answered, granted });
            }
        };
        let (handle, alloc_base, alloc_len) = match answer {
            Answer::Refused(e) if e.status() == UcclStatus::ErrNotSupported => {
                traced(false);
                log::debug!("memory region {} of the peer has no IPC path: {}", key.0, e.message());
                inner.ipc().mark_unavailable(key);
                return Ok(Asked::Unavailable);
            }
            Answer::Refused(e) => {
                traced(false);
                return Ok(Asked::Refused(e));
            }
            Answer::Granted { handle, alloc_base, alloc_len } => (handle, alloc_base, alloc_len),
        };
        drop(inner);
        // Mapping takes the driver a while: outside the lock.
        let mapped = Mapping::open(gpu, &handle);
        let mut inner = self.lock();
        let attached = mapped.and_then(|m| inner.ipc().attach(key, &handle, m));
        if let Err(e) = attached {
            traced(false);
            log::warn!(
                "cannot map the peer's GPU allocation of region {} at {alloc_base:#x} (+{alloc_len}) into GPU {}: \
                 {e}; its transfers take the network path",
                key.0,
                gpu.ordinal()
            );
            inner.ipc().mark_unavailable(key);
            return Ok(Asked::Unavailable);
        }
        traced(true);
        Ok(Asked::Granted)
    }

    /// Takes the peer's IPC messages (and the Deny of an ask), adding the answers to `replies`,
    /// which leave with the state machine's in the order of what they answer; every other message
    /// comes back for the state machine.
    fn handle_ipc(&self, ipc: &mut IpcState, msg: Control, replies: &mut Vec<Control>) -> Result<Option<Control>> {
        match msg {
            Control::IpcRequest { xfer, region, token, segs } => {
                replies.push(self.answer_ipc_request(ipc, xfer, region, token, &segs));
            }
            Control::IpcGrant { xfer, region, handle, alloc_base, alloc_len, windows } => {
                if ipc.granted(xfer, region, handle, alloc_base, alloc_len, &windows)? {
                    self.answered();
                } else {
                    log::debug!("dropping an IPC grant for region {region}: its ask was given up");
                }
            }
            Control::Deny { xfer, status, reason } if xfer & ASK_BIT != 0 => {
                let status =
                    UcclStatus::from_code(status).filter(|s| (*s as i32) < 0).unwrap_or(UcclStatus::ErrUnknown);
                if ipc.refused(xfer, Error::new(status, format!("peer refused: {reason}"))) {
                    self.answered();
                }
            }
            Control::IpcRevoke { region } => {
                if ipc.revoke(region) {
                    replies.push(Control::IpcRevoked { region });
                }
            }
            Control::IpcRevoked { region } => ipc.revoke_answered(region)?,
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    /// The owner's side of an ask: authorized like a vector request, then the handle of the
    /// region's allocation and its windows, or why not.
    fn answer_ipc_request(
        &self,
        ipc: &mut IpcState,
        xfer: u64,
        region: u64,
        token: u64,
        segs: &[RemoteSeg],
    ) -> Control {
        if !self.link().locality.is_local() {
            let e = Error::not_allowed("CUDA IPC handles are handed only to peers on this host");
            return deny_msg(xfer, &e);
        }
        let r = match self.core().regions.authorize_segments(region, token, segs, self.binding()) {
            Ok(r) => r,
            Err(e) => return deny_msg(xfer, &e),
        };
        let Some(export) = r.ipc_export() else {
            let e = Error::new(
                UcclStatus::ErrNotSupported,
                format!(
                    "memory region {region} has no CUDA IPC handle (host memory, or GPU memory of the \
                     virtual memory API)"
                ),
            );
            return deny_msg(xfer, &e);
        };
        // Every window lies inside the region (advertise checks), and the region inside the
        // allocation (`ipc_export` checks); a window's length fits the u32 of its FifoItem.
        let windows =
            r.windows().into_iter().map(|(addr, len)| RemoteSeg { addr: addr as u64, len: len as u32 }).collect();
        ipc.record_grant(region);
        let handle: [u8; IPC_HANDLE_LEN] = export.handle;
        Control::IpcGrant { xfer, region, handle, alloc_base: export.base, alloc_len: export.len, windows }
    }

    /// A caller's wait for `transfer`: blocks on the events of its batches itself, outside the
    /// lock, and finishes them as soon as they fired, instead of sleeping until the progress
    /// thread looks again (it naps between looks while copies are in flight, so each transfer
    /// would pay up to a nap and two thread wake-ups). Returns once no batch of `transfer` is in
    /// flight, or a wait failed (the batch is then left to the progress thread's queries); the
    /// transfer's own wait reports the outcome. Whether it found a batch to wait for.
    fn wait_device_copies(&self, transfer: u64) -> bool {
        let mut waited = false;
        loop {
            let Some(event) = self.lock().ipc().event_of(transfer) else { return waited };
            waited = true;
            let synced = event.synchronize();
            {
                // A failed copy shows in the event's query here, which fails its parts.
                let mut inner = self.lock();
                if let Err(e) = self.drive_device_copies(inner.ipc(), Seer::Wait) {
                    inner.fail(e);
                }
            }
            if synced.is_err() {
                return waited;
            }
        }
    }

    /// Finishes the batches whose copies completed and answers revocations they held up; `by`:
    /// who looks (for the trace). Whether an answer to the peer left (`IpcState::poll`).
    fn drive_device_copies(&self, ipc: &mut IpcState, by: Seer) -> Result<bool> {
        if !ipc.has_pending() {
            return Ok(false);
        }
        let (answered, revoked) = ipc.poll(&self.core().waker, by);
        let moved = answered || !revoked.is_empty();
        for region in revoked {
            self.send(&Control::IpcRevoked { region })?;
        }
        // The offered messages copied (`device_recv.rs`) answered, after their parts finished.
        for answer in ipc.take_answers() {
            self.send(&answer)?;
        }
        Ok(moved)
    }
}

impl<C: Conn> DevicePath for C {}
