#!/usr/bin/env python3
"""vLLM's NixlConnector over our NIXL backend TCPX, on host memory (DRAM) or, with --vram, GPU
memory (VRAM): the prefill engine's workers in one process, the decode engine's in another, each
worker (TP rank) one NIXL agent (under --vram the ranks of one engine share its GPU).

Follows vllm-project/vllm, vllm/distributed/kv_transfer/kv_connector/v1/nixl/
  base_worker.py @ 00bd51312724: NixlBaseConnectorWorker.__init__ (the agent), register_kv_caches,
    register_local_xfer_handler / _build_fa_local, add_remote_agent / _build_fa_remote /
    _build_local_splits_from_plan (heterogeneous TP), _compute_desc_ids, _pop_done_transfers,
    _send_heartbeats, shutdown;
  pull_worker.py @ 0316d25ab528: _read_blocks_for_req, _read_blocks, _get_new_notifs;
  push_worker.py @ 039e79a67a84: _push_writer_loop, _send_registration_to_p, _do_start_push_kv,
    _xfer_blocks, _get_new_notifs, get_transfer_results;
and NIXL's Python agent, ai-dynamo/nixl src/api/python/_api.py @ 8770b655a6b1.

As vLLM does it: agent nixl_agent(str(uuid4()), nixl_agent_config(backends=["TCPX"],
capture_telemetry=True)) (so NIXL creates TCPX with `{}`); one region per KV tensor, K and V apart
(8 layers: 16 regions), or one per layer for MLA, each (base, num_blocks * block_len, device_id,
"") through get_reg_descs(..., nixl_memory_type) + register_memory(descs, backends=["TCPX"]) (the
GPU's index and "VRAM"; here on host memory 0 and "DRAM", as vLLM's CPU KV buffer); descriptors
carry the device id, a remote one that of the peer's metadata; the local list region-major,
prepared once with prep_xfer_dlist("NIXL_INIT_AGENT", ...), each remote rank's once with
prep_xfer_dlist(remote_name, ...); descriptor id = region * num_blocks + block (prefill and decode
have different num_blocks). Pull: the decode side's make_prepped_xfer("READ", ..., notif_msg=
f"{req_id}:{n}"), transfer() (its answer unused, as in vLLM), each step (1 ms) get_new_notifs and
check_xfer_state, get_xfer_telemetry (totalBytes checked) and release_xfer_handle once DONE,
several requests in flight; a prefix hit reads only the last blocks, a full hit sends only the
notification; heartbeats b"HB:" + ",".join(req_ids) to every agent of the prefill engine each
step, growing from 42 B to 4 KiB. The prefill side reads get_new_notifs,
splits "req_id:n" with rsplit(":", 1) and frees a request's blocks once n readers reported (here:
overwrites them at once, so a notification that came before its data shows as wrong bytes).
Heterogeneous TP, as _build_fa_remote has it: 1 prefill -> 2 decode ranks, each reading its half
of every block (remote descriptors of block_len / 2 at rank * block_len / 2), n = 2; 2 prefill ->
1 decode rank, reading each prefill rank's whole blocks into its half of the local block (local
lists split per prefill rank), n = 1. Push: the decode side's writer thread sends b"PUSH_REG:" +
msgpack(registration) with send_notif (the decode side only loads the prefill agent, as
notif_agents_only); the prefill side's nixl-push-writer thread routes it, WRITEs with notification
f"{req_id}:{world_size}" (prefix hits end-trimmed) and its engine thread polls check_xfer_state
and releases, concurrently, on the agent vLLM makes (no sync mode given).

Here instead: the ZMQ handshake (msgspec) is a pipe through the driver; the PUSH_REG payload is a
small hand-written msgpack of the same keys (its bytes are opaque to NIXL); the scheduler is a
fixed plan of requests and steps.
Checked: every byte of every region on the reading (pull) or written (push) side, and nothing else
written; every notification, at each agent, exactly once and from the right agent; each
request's bytes complete when its notification is in; transfer states, and each process's exit.

usage: vllm.py [--path network|same-host] [--vram I,T] [SCENARIO ...]
"""

import functools
import os
import queue
import threading
import time
import uuid

import numpy as np

from common import (
    WAIT_S, Failure, Role, Worker, alloc, check, drain, expect_exact, harness_main, msgpack_pack,
    msgpack_unpack, nixl_agent, nixl_agent_config, pattern, role_gpu, run_roles, short, step,
)

BACKENDS = ["TCPX"]
LAYERS = 8
BLOCK = 4096  # one K (or V) block of all KV heads: 16 tokens x 2 heads x 64 x 2 B
P_BLOCKS, D_BLOCKS = 40, 56
STEP_S = 0.001  # one engine step
PUSH_REG = b"PUSH_REG:"


def as_str(name):
    """add_remote_agent answers the name as bytes; vLLM passes that on as it is."""
    return name.decode() if isinstance(name, bytes) else name


def num_regions(mla):
    return LAYERS if mla else 2 * LAYERS


@functools.lru_cache(maxsize=None)
def full_region(r, mla):
    """Region r's blocks on the prefill engine, all KV heads: (P_BLOCKS, BLOCK), read-only."""
    full = pattern(P_BLOCKS * BLOCK, 1000 + 17 * r + (7 if mla else 0)).reshape(P_BLOCKS, BLOCK)
    full.flags.writeable = False
    return full


def stack_descs(addrs, length, device_id):
    out = np.empty((addrs.shape[0], 3), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = length
    out[:, 2] = device_id
    return out


def compute_desc_ids(block_ids, num_blocks, regions):
    """_compute_desc_ids, all-attention path: region * num_blocks + block, region-major."""
    block_arr = np.concatenate([np.asarray(g, dtype=np.int64) for g in block_ids])[None, :]
    region_ids = np.arange(regions)[:, None]
    return (region_ids * num_blocks + block_arr).flatten()


class KVWorker:
    """One TP rank's connector worker: its agent, KV regions and prepared lists."""

    def __init__(self, role, tp_rank, tp_size, num_blocks, mla, fill, gpu):
        self.tp_rank, self.tp_size, self.num_blocks, self.mla = tp_rank, tp_size, num_blocks, mla
        self.block_len = BLOCK if mla else BLOCK // tp_size
        step(f"{role} rank {tp_rank}: nixl_agent(uuid4, nixl_agent_config(backends=['TCPX'], capture_telemetry=True))")
        self.agent = nixl_agent(str(uuid.uuid4()), nixl_agent_config(backends=BACKENDS, capture_telemetry=True))
        check("TCPX" in self.agent.backends,
              f"the agent made no TCPX backend (plugins: {self.agent.get_plugin_list()}, "
              f"NIXL_PLUGIN_DIR={os.environ.get('NIXL_PLUGIN_DIR')})")
        self.name = self.agent.name
        self.regions = []
        for r in range(num_regions(mla)):
            self.regions.append(alloc(num_blocks * self.block_len, gpu))
            if fill:
                full = full_region(r, mla)
                mine = full if mla else full[:, tp_rank * self.block_len : (tp_rank + 1) * self.block_len]
                self.regions[-1].write(0, np.array(mine).reshape(-1))
        self.nixl_memory_type, self.device_id = self.regions[0].kind, self.regions[0].dev
        step(f"{role} rank {tp_rank}: register_kv_caches ({len(self.regions)} regions)")
        caches_data = [(r.addr, r.size, self.device_id, "") for r in self.regions]
        descs = self.agent.get_reg_descs(caches_data, self.nixl_memory_type)
        self.agent.register_memory(descs, backends=BACKENDS)
        self.registered = [descs]
        step(f"{role} rank {tp_rank}: register_local_xfer_handler")
        arange = np.arange(num_blocks, dtype=np.uint64)
        self.src_blocks_data = np.concatenate(
            [stack_descs(np.uint64(r.addr) + arange * np.uint64(self.block_len), self.block_len, self.device_id)
             for r in self.regions])
        self.src_handle = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT",
                                                     self.agent.get_xfer_descs(self.src_blocks_data, self.nixl_memory_type))
        self.src_split_handles = []
        self.dst_handles, self.remote_agents = {}, {}
        self.role = role

    def blocks(self, r):
        """Region r's blocks as they are now, (num_blocks, block_len)."""
        return self.regions[r].read(0, self.regions[r].size).reshape(self.num_blocks, self.block_len)

    def fill_blocks(self, block_ids, value):
        for region in self.regions:
            for b in block_ids:
                region.write(b * self.block_len, np.full(self.block_len, value, dtype=np.uint8))

    def metadata(self):
        return dict(agent_metadata=self.agent.get_agent_metadata(), name=self.name, tp_rank=self.tp_rank,
                    tp_size=self.tp_size, num_blocks=self.num_blocks, block_len=self.block_len,
                    base_addrs=[r.addr for r in self.regions], device_id=self.device_id)

    def add_remote_engine(self, metas, notif_only=False):
        """add_remote_agent for each prefill rank this rank reads from: the remote list (and, for
        more prefill than decode ranks, the local lists split per prefill rank)."""
        p_tp = metas[0]["tp_size"]
        if self.tp_size >= p_tp:
            ratio = self.tp_size // p_tp
            self.sources, offset_factor, split_reads, self.consumers = [self.tp_rank // ratio], self.tp_rank % ratio, 1, ratio
        else:
            ratio = p_tp // self.tp_size
            self.sources = list(range(self.tp_rank * ratio, (self.tp_rank + 1) * ratio))
            offset_factor, split_reads, self.consumers = 0, ratio, 1
        self.p_tp = p_tp
        for p in self.sources:
            meta = metas[p]
            step(f"{self.role} rank {self.tp_rank}: add_remote_agent(prefill rank {p})")
            name = self.agent.add_remote_agent(meta["agent_metadata"])
            check(as_str(name) == meta["name"], f"add_remote_agent named the peer {name!r}, not {meta['name']!r}")
            self.remote_agents[p] = name
            if notif_only:
                continue
            if p_tp > self.tp_size and not self.mla and not self.src_split_handles:
                step(f"{self.role} rank {self.tp_rank}: local lists split per prefill rank")
                chunk = self.block_len // split_reads
                for i in range(split_reads):
                    handle_data = [(int(a) + i * chunk, chunk, int(d)) for a, _, d in self.src_blocks_data.tolist()]
                    descs = self.agent.get_xfer_descs(handle_data, self.nixl_memory_type)
                    self.src_split_handles.append(self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs))
            step(f"{self.role} rank {self.tp_rank}: remote list of prefill rank {p}")
            num_reads = 1 if self.mla else split_reads
            rank_offset = 0 if self.mla else offset_factor * self.block_len
            length = self.block_len // num_reads
            arange = np.arange(meta["num_blocks"], dtype=np.uint64)
            blocks_data = np.concatenate([
                stack_descs(np.uint64(base + rank_offset) + arange * np.uint64(meta["block_len"]), length, meta["device_id"])
                for base in meta["base_addrs"]])
            self.dst_handles[p] = self.agent.prep_xfer_dlist(name, self.agent.get_xfer_descs(blocks_data, self.nixl_memory_type))

    def expected_block(self, r, p_block):
        """What local block gets from prefill block `p_block` of region r."""
        full = full_region(r, self.mla)[p_block]
        return full if self.mla else full[self.tp_rank * self.block_len : (self.tp_rank + 1) * self.block_len]

    def shutdown(self, notif_only=False):
        step(f"{self.role} rank {self.tp_rank}: shutdown (release lists, remove agents, deregister)")
        for h in [self.src_handle, *self.src_split_handles, *self.dst_handles.values()]:
            self.agent.release_dlist_handle(h)
        for name in self.remote_agents.values():
            self.agent.remove_remote_agent(name)
        for descs in self.registered:
            self.agent.deregister_memory(descs)


def take_telemetry(agent, handle, nbytes, what):
    res = agent.get_xfer_telemetry(handle)
    check(res.totalBytes == nbytes, f"{what}: get_xfer_telemetry totalBytes {res.totalBytes}, expected {nbytes}")


# ---- pull (READ by the decode side) -------------------------------------------------------------


def prefill_pull(link, cfg):
    gpu = role_gpu()
    ranks = [KVWorker("prefill", p, cfg["p_tp"], P_BLOCKS, cfg["mla"], fill=True, gpu=gpu) for p in range(cfg["p_tp"])]
    link.send("meta", [w.metadata() for w in ranks])
    plan = cfg["requests"]
    blocks_of = {q["p_req"]: q["p_blocks"] for q in plan}
    # Readers per prefill rank and request: n each, so n notifications "req:n" per rank.
    n = cfg["d_tp"] // cfg["p_tp"] if cfg["d_tp"] >= cfg["p_tp"] else 1
    counts = [dict() for _ in ranks]
    received = [[] for _ in ranks]
    expected, done = None, []
    step("prefill: get_new_notifs each step until every reader reported")
    deadline = time.monotonic() + WAIT_S
    while True:
        for p, w in enumerate(ranks):
            for sender, msgs in w.agent.get_new_notifs().items():
                for m in msgs:
                    received[p].append((sender, bytes(m)))
                    msg = bytes(m).decode("utf-8")
                    if msg.startswith("HB:"):
                        continue
                    req_id, consumers = msg.rsplit(":", 1)
                    check(req_id in blocks_of, f"rank {p}: notification for an unknown request: {short(m)}")
                    check(int(consumers) == n, f"rank {p}: {msg!r} names {consumers} readers, expected {n}")
                    counts[p][req_id] = counts[p].get(req_id, 0) + 1
                    check(counts[p][req_id] <= n, f"rank {p}: {msg!r} more than {n} times")
                    if counts[p][req_id] == n:
                        # The blocks are free now: reuse them at once.
                        w.fill_blocks(blocks_of[req_id], 0xEE)
                        done.append((p, req_id))
        if expected is None:
            got = link.poll("expect")
            if got is not None:
                expected = got[0]
                deadline = time.monotonic() + WAIT_S
        if expected is not None and all(len(received[p]) >= len(expected[p]) for p in range(len(ranks))):
            break
        if time.monotonic() > deadline:
            missing = {p: len(expected[p]) - len(received[p]) for p in range(len(ranks))} if expected else "?"
            raise Failure("prefill: waiting for notifications", f"not all arrived within {WAIT_S:.0f} s (missing per rank: {missing})")
        time.sleep(STEP_S)
    step("prefill: no notification more than once (0.3 s more)")
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        for p, w in enumerate(ranks):
            for sender, msgs in w.agent.get_new_notifs().items():
                received[p].extend((sender, bytes(m)) for m in msgs)
        time.sleep(0.01)
    step("prefill: every notification exactly")
    for p in range(len(ranks)):
        expect_exact(received[p], [tuple(x) for x in expected[p]], f"prefill rank {p}'s notifications")
    check(sorted(done) == sorted((p, q["p_req"]) for q in plan for p in range(len(ranks))),
          f"requests freed: {sorted(done)}")
    # Heartbeats of one sender in the order sent (NIXL does not promise it; reported, not held).
    order = []
    for p in range(len(ranks)):
        for sender in {s for s, _ in expected[p]}:
            want = [m for s, m in expected[p] if s == sender and m.startswith(b"HB:")]
            got = [m for s, m in received[p] if s == sender and m.startswith(b"HB:")]
            if got != want:
                order.append(f"rank {p} from {sender[:8]}")
    for w in ranks:
        w.shutdown()
    link.send("report", order)


def decode_pull(link, cfg):
    gpu = role_gpu(second=True)
    ranks = [KVWorker("decode", d, cfg["d_tp"], D_BLOCKS, cfg["mla"], fill=False, gpu=gpu) for d in range(cfg["d_tp"])]
    link.send("meta", [w.metadata() for w in ranks])
    (pmetas,) = link.recv("remote")
    for w in ranks:
        w.add_remote_engine(pmetas)
    regions = num_regions(cfg["mla"])
    plan, hb_ids = cfg["requests"], cfg["hb_ids"]
    expected = [[np.zeros_like(w.blocks(r)) for r in range(regions)] for w in ranks]
    sent = [[] for _ in range(cfg["p_tp"])]  # per prefill rank: (sender, message) that must arrive
    in_flight = []  # (worker, request, handle, bytes)
    last_start = max(q["start_step"] for q in plan)
    n_step = 0
    deadline = time.monotonic() + WAIT_S
    while True:
        step(f"decode: step {n_step}: start_load_kv")
        for q in (q for q in plan if q["start_step"] == n_step):
            for w in ranks:
                for i, p in enumerate(w.sources):
                    notif_id = f"{q['p_req']}:{w.consumers}".encode()
                    sent[p].append((w.name, notif_id))
                    if not q["d_blocks"]:
                        # Full prefix hit: only the notification.
                        step(f"decode: step {n_step}: send_notif of a full prefix hit")
                        w.agent.send_notif(w.remote_agents[p], notif_msg=notif_id)
                        continue
                    local_blocks = q["d_blocks"]
                    remote_blocks = q["p_blocks"][-len(local_blocks):]  # _apply_prefix_caching
                    local_h = w.src_split_handles[i] if (w.p_tp > w.tp_size and not w.mla) else w.src_handle
                    remote_ids = compute_desc_ids([remote_blocks], P_BLOCKS, regions)
                    local_ids = compute_desc_ids([local_blocks], D_BLOCKS, regions)
                    step(f"decode: step {n_step}: make_prepped_xfer READ of {len(local_ids)} blocks, {notif_id.decode()}")
                    handle = w.agent.make_prepped_xfer("READ", local_h, local_ids, w.dst_handles[p], remote_ids, notif_msg=notif_id)
                    step(f"decode: step {n_step}: transfer")
                    w.agent.transfer(handle)
                    nbytes = len(local_ids) * (w.block_len if (w.mla or w.p_tp <= w.tp_size) else w.block_len // len(w.sources))
                    in_flight.append((w, q["p_req"], handle, nbytes))
                    for r in range(regions):
                        for lb, rb in zip(local_blocks, remote_blocks):
                            expected[w.tp_rank][r][lb] = w.expected_block(r, rb)
        if n_step < cfg["hb_steps"]:
            step(f"decode: step {n_step}: heartbeats")
            hb_msg = ("HB:" + ",".join(hb_ids[: min(len(hb_ids), 1 + 4 * n_step)])).encode()
            for w in ranks:
                for p, name in w.remote_agents.items():
                    w.agent.send_notif(name, notif_msg=hb_msg)
                    sent[p].append((w.name, hb_msg))
        step(f"decode: step {n_step}: get_finished (get_new_notifs, check_xfer_state of {len(in_flight)} in flight)")
        for w in ranks:  # every worker reads its notifications each step; a reader gets none
            stray = w.agent.get_new_notifs()
            check(not any(stray.values()), f"rank {w.tp_rank} got notifications: {short(stray)}")
        still = []
        for w, req, handle, nbytes in in_flight:
            state = w.agent.check_xfer_state(handle)
            if state == "DONE":
                take_telemetry(w.agent, handle, nbytes, f"READ of {req}")
                w.agent.release_xfer_handle(handle)
            elif state == "PROC":
                still.append((w, req, handle, nbytes))
            else:
                raise Failure(f"decode: step {n_step}: get_finished", f"READ of {req}: check_xfer_state answered {state}")
        in_flight = still
        if n_step >= last_start and n_step >= cfg["hb_steps"] and not in_flight:
            break
        if time.monotonic() > deadline:
            raise Failure(f"decode: step {n_step}: get_finished", f"{len(in_flight)} READs still PROC after {WAIT_S:.0f} s (hang)")
        n_step += 1
        time.sleep(STEP_S)
    step("decode: every byte of every region")
    for w in ranks:
        for r in range(regions):
            bad = np.flatnonzero((w.blocks(r) != expected[w.tp_rank][r]).any(axis=1))
            check(bad.size == 0, f"rank {w.tp_rank} region {r}: blocks {bad[:8].tolist()} differ from "
                  "what the READs should have brought (0xee: the prefill side freed them before the READ ended)")
    link.send("sent", sent)
    link.recv("prefill-done")
    for w in ranks:
        w.shutdown()


def make_pull_plan(seed, n_req, kinds, p_tp, d_tp, mla, hb_steps):
    rng = np.random.default_rng(seed)
    p_free, d_free = list(rng.permutation(P_BLOCKS)), list(rng.permutation(D_BLOCKS))
    reqs = []
    for i, kind in enumerate(kinds):
        n = int(rng.integers(3 if kind == "partial-hit" else 1, 6))
        p_blocks = [int(p_free.pop()) for _ in range(n)]
        m = 0 if kind == "full-hit" else (n - 2 if kind == "partial-hit" else n)
        d_blocks = [int(d_free.pop()) for _ in range(m)]
        reqs.append(dict(p_req=f"cmpl-{rng.bytes(16).hex()}-0", p_blocks=p_blocks, d_blocks=d_blocks,
                         start_step=i // 3, kind=kind))
    hb_ids = [f"cmpl-{rng.bytes(16).hex()}-0" for _ in range(100)]
    return dict(requests=reqs, hb_ids=hb_ids, p_tp=p_tp, d_tp=d_tp, mla=mla, hb_steps=hb_steps)


def pull(seed, kinds, p_tp=1, d_tp=1, mla=False, hb_steps=3):
    cfg = make_pull_plan(seed, len(kinds), kinds, p_tp, d_tp, mla, hb_steps)
    with run_roles(Role("prefill", prefill_pull, cfg), Role("decode", decode_pull, cfg)) as (P, D):
        step("metadata exchange")
        (pmetas,) = P.recv("meta")
        D.recv("meta")
        D.send("remote", pmetas)
        step("decode: the requests")
        (sent,) = D.recv("sent", timeout=2 * WAIT_S)
        P.send("expect", sent)
        step("prefill: the notifications")
        (order,) = P.recv("report", timeout=2 * WAIT_S)
        D.send("prefill-done")
        step("teardown")
        P.finish()
        D.finish()
    nmsg = sum(len(s) for s in sent)
    hb = max((len(m) for s in sent for _, m in s if m.startswith(b"HB:")), default=0)
    note = f"{len(kinds)} requests, {nmsg} notifications (largest heartbeat {hb} B)"
    return note + (f"; heartbeats reordered: {order}" if order else "")


# ---- push (WRITE by the prefill side) -----------------------------------------------------------


def prefill_push(link, cfg):
    w = KVWorker("prefill", 0, 1, P_BLOCKS, False, fill=True, gpu=role_gpu())
    link.send("meta", [w.metadata()])
    (dmetas,) = link.recv("remote")
    # P -> D handshake: the decode agent and its blocks.
    dmeta = dmetas[0]
    step("prefill: add_remote_agent(decode) and its remote list")
    d_name = w.agent.add_remote_agent(dmeta["agent_metadata"])
    check(as_str(d_name) == dmeta["name"], f"add_remote_agent named the peer {d_name!r}")
    arange = np.arange(dmeta["num_blocks"], dtype=np.uint64)
    blocks_data = np.concatenate([stack_descs(np.uint64(b) + arange * np.uint64(dmeta["block_len"]), dmeta["block_len"],
                                              dmeta["device_id"]) for b in dmeta["base_addrs"]])
    dst_handle = w.agent.prep_xfer_dlist(d_name, w.agent.get_xfer_descs(blocks_data, w.nixl_memory_type))
    regions = num_regions(False)
    plan = cfg["requests"]
    finished_inbox, completion_notifs = queue.Queue(), queue.Queue()
    wake, stop = threading.Event(), threading.Event()
    sending, lock = {}, threading.Lock()
    received = []  # every (sender, message) this agent got
    pushed = []

    def do_start_push_kv(rid, p_blocks, reg):
        remote_block_ids = reg["local_block_ids"]
        decode_request_id = reg["request_id"]
        notif_id = f"{decode_request_id}:{1}".encode()  # world_size 1
        # _apply_prefix_caching: end-trim the prefill blocks to the decode side's count.
        n = sum(len(g) for g in remote_block_ids)
        local = [p_blocks[-n:]]
        remote_ids = compute_desc_ids(remote_block_ids, dmeta["num_blocks"], regions)
        local_ids = compute_desc_ids(local, P_BLOCKS, regions)
        step(f"nixl-push-writer: make_prepped_xfer WRITE {notif_id.decode()}")
        handle = w.agent.make_prepped_xfer("WRITE", w.src_handle, local_ids, dst_handle, remote_ids, notif_msg=notif_id)
        step(f"nixl-push-writer: transfer {notif_id.decode()}")
        w.agent.transfer(handle)
        with lock:
            sending.setdefault(rid, []).append((handle, len(local_ids) * BLOCK))
        pushed.append(rid)

    def push_writer_loop():
        finished, pending = {}, {}
        while not stop.is_set():
            step("nixl-push-writer: finished blocks")
            for rid, blocks in drain(finished_inbox):
                if rid in pending:
                    do_start_push_kv(rid, blocks, pending.pop(rid))
                else:
                    finished[rid] = blocks
            step("nixl-push-writer: get_new_notifs")
            for sender, notifs in w.agent.get_new_notifs().items():
                for notif in notifs:
                    notif = bytes(notif)
                    received.append((sender, notif))
                    if notif.startswith(PUSH_REG):
                        reg = msgpack_unpack(notif[len(PUSH_REG):])
                        rid = reg.get("request_id") if isinstance(reg, dict) else None
                        check(isinstance(rid, str), f"PUSH_REG without request_id: {short(notif)}")
                        if rid in finished:
                            do_start_push_kv(rid, finished.pop(rid), reg)
                        else:
                            pending[rid] = reg
                    else:
                        completion_notifs.put((sender, notif))
            if finished:
                stop.wait(0.001)
            else:
                wake.wait(WAIT_S)
                wake.clear()

    writer = Worker("nixl-push-writer", push_writer_loop)
    writer.start()
    expected, heartbeats, done = None, [], set()
    n_step = 0
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            step(f"prefill: step {n_step}: finished requests to the writer")
            for q in (q for q in plan if q["finish_step"] == n_step):
                finished_inbox.put((q["req"], q["p_blocks"]))
            wake.set()
            step(f"prefill: step {n_step}: get_transfer_results (check_xfer_state)")
            with lock:
                for rid, handles in list(sending.items()):
                    left = []
                    for handle, nbytes in handles:
                        state = w.agent.check_xfer_state(handle)
                        if state == "DONE":
                            take_telemetry(w.agent, handle, nbytes, f"WRITE of {rid}")
                            w.agent.release_xfer_handle(handle)
                        elif state == "PROC":
                            left.append((handle, nbytes))
                        else:
                            raise Failure(f"prefill: step {n_step}: get_transfer_results", f"WRITE of {rid}: {state}")
                    if left:
                        sending[rid] = left
                    else:
                        del sending[rid]
                        done.add(rid)
            for sender, notif in drain(completion_notifs):
                check(notif.startswith(b"HB:"), f"unexpected notification {short(notif)} from {sender}")
                heartbeats.append((sender, notif))
            writer.reraise()
            if expected is None:
                got = link.poll("expect")
                expected = got[0] if got else None
            if expected is not None and len(done) == len(plan) and len(received) >= len(expected):
                break
            if time.monotonic() > deadline:
                raise Failure(f"prefill: step {n_step}", f"pushed {sorted(done)} of {len(plan)}, "
                              f"{len(received)} notifications (expected {len(expected) if expected else '?'}) after {WAIT_S:.0f} s")
            n_step += 1
            time.sleep(0.001)
    finally:
        stop.set()
        wake.set()
        writer.join(WAIT_S)
    writer.reraise()
    step("prefill: no notification more than once (0.3 s more)")
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        for sender, msgs in w.agent.get_new_notifs().items():
            received.extend((sender, bytes(m)) for m in msgs)
        time.sleep(0.01)
    step("prefill: every PUSH_REG and heartbeat exactly")
    expect_exact(received, [tuple(x) for x in expected], "the prefill side's notifications")
    check(sorted(pushed) == sorted(q["req"] for q in plan), f"pushed {sorted(pushed)}")
    w.agent.release_dlist_handle(dst_handle)
    w.remote_agents[0] = d_name
    w.shutdown()
    link.send("report", len(received))


def decode_push(link, cfg):
    w = KVWorker("decode", 0, 1, D_BLOCKS, False, fill=False, gpu=role_gpu(second=True))
    link.send("meta", [w.metadata()])
    (pmetas,) = link.recv("remote")
    # D -> P handshake, notif_agents_only: the prefill agent only.
    w.add_remote_engine(pmetas, notif_only=True)
    p_name = w.remote_agents[0]
    regions = num_regions(False)
    plan = cfg["requests"]
    reg_send_inbox, pending_completion = queue.Queue(), queue.Queue()
    wake, stop = threading.Event(), threading.Event()
    sent = []

    def push_writer_loop():
        while not stop.is_set():
            for rid, reg in drain(reg_send_inbox):
                step(f"nixl-push-writer: send_notif PUSH_REG of {rid}")
                notif_msg = PUSH_REG + msgpack_pack(reg)
                w.agent.send_notif(p_name, notif_msg=notif_msg)
                sent.append((w.name, notif_msg))
            step("nixl-push-writer: get_new_notifs")
            for sender, notifs in w.agent.get_new_notifs().items():
                for notif in notifs:
                    pending_completion.put((sender, bytes(notif)))
            wake.wait(WAIT_S)
            wake.clear()

    writer = Worker("nixl-push-writer", push_writer_loop)
    writer.start()
    expected = [np.zeros_like(w.blocks(r)) for r in range(regions)]
    registered, done, got = set(), set(), []
    n_step = 0
    deadline = time.monotonic() + WAIT_S
    try:
        while len(done) < len(plan):
            step(f"decode: step {n_step}: push registrations")
            for q in (q for q in plan if q["reg_step"] == n_step):
                reg = dict(request_id=q["req"], local_block_ids=[q["d_blocks"]], decode_engine_id=cfg["d_engine"],
                           decode_host="127.0.0.1", decode_port=5600, decode_tp_size=1,
                           remote_engine_id=cfg["p_engine"], remote_host="127.0.0.1", remote_port=5557,
                           remote_tp_size=1, remote_pp_size=1)
                reg_send_inbox.put((q["req"], reg))
                registered.add(q["req"])
            waiting = sorted(registered - done)
            if waiting and n_step % 2 == 0:
                step(f"decode: step {n_step}: heartbeat")
                hb_msg = ("HB:" + ",".join(waiting)).encode()
                w.agent.send_notif(p_name, notif_msg=hb_msg)
                sent.append((w.name, hb_msg))
            wake.set()
            step(f"decode: step {n_step}: completion notifications")
            for sender, notif in drain(pending_completion):
                got.append((sender, notif))
                msg = notif.decode("utf-8")
                req_id, tp_size = msg.rsplit(":", 1)
                check(sender == as_str(p_name) and req_id in registered and int(tp_size) == 1 and req_id not in done,
                      f"unexpected notification {msg!r} from {sender}")
                done.add(req_id)
                q = next(q for q in plan if q["req"] == req_id)
                n = len(q["d_blocks"])
                for r in range(regions):
                    expected[r][q["d_blocks"]] = full_region(r, False)[q["p_blocks"][-n:]]
                    have = w.blocks(r)
                    bad = [b for b in q["d_blocks"] if not np.array_equal(have[b], expected[r][b])]
                    check(not bad, f"{req_id}: region {r} blocks {bad} lack the pushed bytes when its notification came")
            writer.reraise()
            if time.monotonic() > deadline:
                raise Failure(f"decode: step {n_step}", f"pushes done: {sorted(done)} of {len(plan)} after {WAIT_S:.0f} s")
            n_step += 1
            time.sleep(0.001)
        link.send("sent", sent[:])
        step("decode: no notification more than once (0.3 s more)")
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            wake.set()
            time.sleep(0.01)
    finally:
        stop.set()
        wake.set()
        writer.join(WAIT_S)
    writer.reraise()
    got.extend(drain(pending_completion))
    expect_exact(got, [(as_str(p_name), f"{q['req']}:1".encode()) for q in plan], "the decode side's notifications")
    step("decode: every byte of every region")
    for r in range(regions):
        check(np.array_equal(w.blocks(r), expected[r]), f"region {r} differs from what the pushes should have written")
    link.recv("prefill-done")
    w.shutdown(notif_only=True)


def push(seed):
    rng = np.random.default_rng(seed)
    p_free, d_free = list(rng.permutation(P_BLOCKS)), list(rng.permutation(D_BLOCKS))
    reqs = []
    # Registration before the prefill finished, after it, and a prefix hit (fewer decode blocks).
    for i, (reg_step, finish_step, hit) in enumerate([(0, 3, 0), (2, 0, 0), (1, 1, 0), (0, 4, 2), (3, 2, 0), (4, 4, 0)]):
        n = int(rng.integers(3, 7))
        p_blocks = [int(p_free.pop()) for _ in range(n)]
        d_blocks = [int(d_free.pop()) for _ in range(n - hit)]
        reqs.append(dict(req=f"cmpl-{rng.bytes(16).hex()}-0", p_blocks=p_blocks, d_blocks=d_blocks,
                         reg_step=reg_step, finish_step=finish_step))
    cfg = dict(requests=reqs, p_engine=str(uuid.UUID(bytes=rng.bytes(16))), d_engine=str(uuid.UUID(bytes=rng.bytes(16))))
    with run_roles(Role("prefill", prefill_push, cfg), Role("decode", decode_push, cfg)) as (P, D):
        step("metadata exchange")
        (pmetas,) = P.recv("meta")
        (dmetas,) = D.recv("meta")
        D.send("remote", pmetas)
        P.send("remote", dmetas)
        step("the pushes")
        (sent,) = D.recv("sent", timeout=2 * WAIT_S)
        P.send("expect", sent)
        (n,) = P.recv("report", timeout=2 * WAIT_S)
        D.send("prefill-done")
        step("teardown")
        P.finish()
        D.finish()
    return f"{len(reqs)} requests, {n} notifications to the prefill side"


SCENARIOS = [
    ("pull", lambda: pull(1, ["normal"] * 6 + ["partial-hit", "full-hit"], hb_steps=26)),
    ("pull-mla", lambda: pull(2, ["normal", "normal", "partial-hit", "full-hit"], mla=True)),
    ("pull-tp1to2", lambda: pull(3, ["normal", "normal", "partial-hit", "full-hit"], p_tp=1, d_tp=2)),
    ("pull-tp2to1", lambda: pull(4, ["normal", "normal", "partial-hit", "full-hit"], p_tp=2, d_tp=1)),
    ("push", lambda: push(5)),
]

if __name__ == "__main__":
    harness_main("vllm", SCENARIOS)
