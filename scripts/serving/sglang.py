#!/usr/bin/env python3
"""SGLang's NIXL prefill/decode disaggregation over our NIXL backend TCPX, on host memory (DRAM)
or, with --vram, GPU memory as SGLang has it (VRAM): the prefill engine's NixlKVManager in one
process, the decode engine's in another.

Follows sgl-project/sglang python/sglang/srt/disaggregation/nixl/conn.py @ 8d9468505bb1
(NixlKVManager.__init__, register_buffer_to_engine, _add_remote_peer, _prepare_payload_xfer /
_prep_equal_tp_dlist, transfer_worker, send_kvcache on the prepared lists, maybe_send_extra /
_send_kvcache_generic for the state, send_aux, update_transfer_status) and
python/sglang/srt/environ.py @ 8d9468505bb1 (SGLANG_DISAGGREGATION_NIXL_BACKEND = "UCX",
SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS = "{}", SGLANG_DISAGGREGATION_QUEUE_SIZE = 4); NIXL's
Python agent: ai-dynamo/nixl src/api/python/_api.py @ 8770b655a6b1.

As SGLang does it: the backend comes from SGLANG_DISAGGREGATION_NIXL_BACKEND and its parameters
from SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS (a JSON object of strings, else ValueError), read
here exactly so (this harness sets TCPX and {"timeout_ms": "10000"} unless the environment has
them); nixl_agent(str(uuid4()), nixl_agent_config(backends=[], num_threads=8 on prefill else 0,
sync_mode=NIXL_THREAD_SYNC_STRICT)) (a nixl_agent_config without num_threads or sync_mode gets
what it takes), thread counts added to the parameters of UCX/OBJ/GDS_MT/UCCL only, then
create_backend(backend, params), and a backend not in get_plugin_list() is a ValueError (scenario
`env` checks these rules, a missing plugin and a parameter TCPX refuses). KV buffers (K then V of
16 layers: 32 regions) are registered with register_memory(list, "VRAM"), device id gpu_id
(on host memory: "DRAM" and 0, as SGLang's host KV pool), aux buffers as DRAM, state buffers as
VRAM (on host memory: DRAM); the decode side's registration carries its gpu_id. The prefill
side's bootstrap thread loads the decode agent and prepares both lists once: the source with
prep_xfer_dlist("", Nx3, "VRAM") (or "DRAM"), the destination with the decode agent's name and
gpu_id, one descriptor per region and page (index = region * num_slots + page, int32). Rooms
(random 63-bit ids, as bootstrap rooms are) are cut into chunks; each chunk goes to transfer
queue room % 4, each of the SGLANG_DISAGGREGATION_QUEUE_SIZE threads serving its own queue:
make_prepped_xfer("WRITE", src, idx, dst, idx, f"{room}_kv_{chunk}_{0|1}_{rank}"), transfer()
("ERR" raises); on a room's last chunk the state by initialize_xfer (f"{room}_state_{rank}", one
descriptor per state buffer and run of slots, of the state's memory) and the aux by
get_xfer_descs(..., "DRAM") + initialize_xfer (f"{room}_aux"); then check_xfer_state over all the
chunk's handles, time.sleep(0) between rounds, until DONE. The handles are never released by
name: the next chunk's `handles = []` drops them (NIXL's handle object releases itself). The
decode side reads get_new_notifs, splits each on "_" (maxsplit 8) and accounts rooms.

Here instead: the bootstrap server and ZMQ messages (KVArgsRegisterInfo, TransferInfo) are a pipe
through the driver; the scheduler is a fixed plan of rooms and chunks.
Checked: every byte of every page, aux and state slot (and nothing else written), each room's
kv/aux/state notification exactly once, a room's bytes complete when its notifications are in.

usage: sglang.py [--path network|same-host] [--vram I,T] [SCENARIO ...]
"""

import inspect
import json
import os
import queue
import threading
import time
import uuid

import numpy as np

from common import (
    WAIT_S, Failure, Role, Worker, alloc, check, expect_exact, harness_main, nixl_agent, nixl_agent_config,
    nixl_thread_sync_t, pattern, role_gpu, run_roles, short, step,
)

LAYERS = 16
ITEM = 2048  # one page of one layer's K (or V)
P_SLOTS, D_SLOTS = 192, 224
AUX_LENS = [256, 4096]
AUX_SLOTS = 32
STATE_LENS = [512, 1536]
STATE_SLOTS = 32
ENGINE_RANK = 0


def nixl_env(environ):
    """The backend and its parameters, as NixlKVManager.__init__ reads them."""
    backend = environ.get("SGLANG_DISAGGREGATION_NIXL_BACKEND", "UCX")
    backend_params = json.loads(environ.get("SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS", "{}"))
    if not isinstance(backend_params, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in backend_params.items()
    ):
        raise ValueError(
            "SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS must be a JSON object "
            "with string keys and string values"
        )
    return backend, backend_params


def make_agent(mode, environ=os.environ):
    backend, backend_params = nixl_env(environ)
    num_threads = 8 if mode == "prefill" else 0
    # The transfer threads and the bootstrap thread share the agent: STRICT.
    taken = inspect.signature(nixl_agent_config).parameters
    kwargs = dict(backends=[])
    if "num_threads" in taken:
        kwargs["num_threads"] = num_threads
    if "sync_mode" in taken and nixl_thread_sync_t is not None:
        kwargs["sync_mode"] = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
    agent = nixl_agent(str(uuid.uuid4()), nixl_agent_config(**kwargs))
    if num_threads > 0:
        if backend == "UCX" or backend == "OBJ":
            backend_params.setdefault("num_threads", str(num_threads))
        elif backend == "GDS_MT":
            backend_params.setdefault("thread_count", str(num_threads))
        elif backend == "UCCL":
            backend_params.setdefault("num_cpus", str(num_threads))
    agent.create_backend(backend, backend_params)
    available_plugins = agent.get_plugin_list()
    if backend not in available_plugins:
        raise ValueError(
            f"NIXL backend '{backend}' not found. Available: {available_plugins}. "
            f"Please install the required NIXL plugin or choose from: {available_plugins}"
        )
    return agent, backend, backend_params


def repeat_indices_over_layers(indices, num_layers, layer_length):
    offsets = np.arange(num_layers, dtype=np.int32) * layer_length
    return (offsets[:, None] + indices[None, :]).ravel().astype(np.int32)


def group_concurrent_contiguous(src, dst):
    """Runs of indices contiguous on both sides (SGLang's common/utils.py)."""
    if src.size == 0:
        return [], []
    brk = np.where((np.diff(src) != 1) | (np.diff(dst) != 1))[0] + 1
    return [g.tolist() for g in np.split(src, brk)], [g.tolist() for g in np.split(dst, brk)]


def contents(slots, fill):
    """One side's KVArgs bytes: KV regions (K of every layer, then V), aux and state buffers."""

    def buf(n, seed):
        return pattern(n, seed) if fill else np.zeros(n, dtype=np.uint8)

    return dict(kv=[buf(slots * ITEM, 3000 + i) for i in range(2 * LAYERS)],
                aux=[buf(AUX_SLOTS * n, 4000 + j) for j, n in enumerate(AUX_LENS)],
                state=[buf(STATE_SLOTS * n, 5000 + j) for j, n in enumerate(STATE_LENS)])


class Buffers:
    """One side's KVArgs in memory: KV and state buffers on its GPU under --vram, aux buffers on
    the host (SGLang's are)."""

    def __init__(self, slots, fill, gpu):
        self.num_slots, self.gpu_id = slots, gpu or 0
        for kind, arrays in contents(slots, fill).items():
            mems = [alloc(a.size, None if kind == "aux" else gpu) for a in arrays]
            for m, a in zip(mems, arrays if fill else ()):
                m.write(0, a)
            setattr(self, kind, mems)

    @staticmethod
    def ptrs(bufs):
        return [b.addr for b in bufs]

    def arrays(self):
        """The bytes now, as contents() has them."""
        return {kind: [b.read(0, b.size) for b in getattr(self, kind)] for kind in ("kv", "aux", "state")}

    def register(self, agent):
        for kind in ("kv", "aux", "state"):
            bufs = getattr(self, kind)
            step(f"register_buffer_to_engine: {kind} ({bufs[0].kind})")
            descs = agent.register_memory([(b.addr, b.size, b.dev, "") for b in bufs], bufs[0].kind)
            check(descs is not None, f"NIXL memory registration failed for {kind} tensors")
            setattr(self, f"{kind}_descs", descs)


def nixl_device_id(mem_kind, gpu_id):
    return gpu_id if mem_kind == "VRAM" else 0


def prep_equal_tp_dlist(agent, peer_name, kv_ptrs, item_lens, data_lens, gpu_id, num_slots=None, mem_kind="VRAM"):
    device_id = nixl_device_id(mem_kind, gpu_id)
    arrays = []
    for base_ptr, item_len, data_len in zip(np.array(kv_ptrs, dtype=np.uint64), item_lens, data_lens):
        n = num_slots if num_slots is not None else data_len // item_len
        addrs = np.arange(n, dtype=np.uint64) * np.uint64(item_len) + base_ptr
        arrays.append(np.column_stack([addrs, np.full(n, item_len, dtype=np.uint64), np.full(n, device_id, dtype=np.uint64)]))
    handle = agent.prep_xfer_dlist(peer_name, np.vstack(arrays), mem_kind)
    check(handle is not None, f"prep_xfer_dlist returned None for peer '{peer_name}'")
    return handle


# ---- prefill ------------------------------------------------------------------------------------


def prefill(link, cfg):
    gpu = role_gpu()
    step("NixlKVManager(PREFILL): the agent from the environment")
    agent, backend, params = make_agent("prefill")
    check(backend == "TCPX", f"SGLANG_DISAGGREGATION_NIXL_BACKEND is {backend!r}")
    bufs = Buffers(P_SLOTS, fill=True, gpu=gpu)
    bufs.register(agent)
    queue_size = int(os.environ.get("SGLANG_DISAGGREGATION_QUEUE_SIZE", "4"))
    transfer_queues = [queue.Queue() for _ in range(queue_size)]
    status, exceptions, lock = {}, {}, threading.Lock()
    prep = {}
    decode_kv_args_table = {}
    link.send("meta", agent.name)

    def transfer_worker(q):
        while True:
            kv_chunk = q.get()
            room = kv_chunk["room"]
            handles = []
            try:
                with lock:
                    status[room] = "Transferring" if status.get(room) != "Success" else status[room]
                req = transfer_infos[room]
                dst_info = decode_kv_args_table[req["agent_name"]]
                if len(kv_chunk["prefill_kv_indices"]) > 0:
                    chunked_dst = np.asarray(req["dst_kv_indices"][kv_chunk["index_slice"][0] : kv_chunk["index_slice"][1]], dtype=np.int32)
                    notif = f"{room}_kv_{kv_chunk['chunk_id']}_{int(kv_chunk['is_last'])}_{ENGINE_RANK}"
                    step(f"transfer worker: send_kvcache {notif}")
                    num_layers = len(bufs.kv)
                    src_indices = repeat_indices_over_layers(np.asarray(kv_chunk["prefill_kv_indices"], dtype=np.int32), num_layers, P_SLOTS)
                    dst_indices = repeat_indices_over_layers(chunked_dst, num_layers, dst_info["num_slots"])
                    h = agent.make_prepped_xfer("WRITE", prep[""], src_indices, prep[req["agent_name"]], dst_indices, notif.encode("ascii"))
                    check(bool(h), "KVSender failed to create prepped transfer")
                    state = agent.transfer(h)
                    check(state != "ERR", f"KVSender failed to post prepped transfer ({notif})")
                    handles.append(h)
                if kv_chunk["is_last"]:
                    if kv_chunk["state_indices"]:
                        notif = f"{room}_state_{ENGINE_RANK}"
                        step(f"transfer worker: maybe_send_extra {notif}")
                        handles.append(send_state(kv_chunk["state_indices"], req, dst_info, notif))
                    notif = f"{room}_aux"
                    step(f"transfer worker: send_aux {notif}")
                    handles.append(send_aux(kv_chunk["prefill_aux_index"], dst_info, req["dst_aux_index"], notif, req["agent_name"]))
                step(f"transfer worker: check_xfer_state of room {room} chunk {kv_chunk['chunk_id']}")
                deadline = time.monotonic() + WAIT_S
                while handles:
                    states = [agent.check_xfer_state(h) for h in handles]
                    if any(s == "ERR" for s in states):
                        raise Failure(f"transfer worker: room {room}", f"NIXL transfer encountered ERR room={room}")
                    if all(s == "DONE" for s in states):
                        break
                    if time.monotonic() > deadline:
                        raise Failure(f"transfer worker: room {room}", f"still {states} after {WAIT_S:.0f} s (hang)")
                    time.sleep(0)
                with lock:
                    status[room] = "Success" if kv_chunk["is_last"] else status[room]
            except Exception as e:
                with lock:
                    exceptions[room] = e
                    status[room] = "Failed"

    def send_aux(prefill_aux_index, dst_info, dst_aux_index, notif, peer_name):
        aux_item_len = AUX_LENS[0]
        src_addrs = [(bufs.ptrs(bufs.aux)[0] + prefill_aux_index * aux_item_len, aux_item_len, 0)]
        dst_addrs = [(dst_info["aux_ptrs"][0] + dst_aux_index * aux_item_len, aux_item_len, 0)]
        src_descs = agent.get_xfer_descs(src_addrs, "DRAM")
        dst_descs = agent.get_xfer_descs(dst_addrs, "DRAM")
        h = agent.initialize_xfer("WRITE", src_descs, dst_descs, peer_name, notif.encode("ascii"))
        check(bool(h), "KVSender failed to create transfer")
        state = agent.transfer(h)
        check(state != "ERR", f"KVSender failed to post transfer ({notif})")
        return h

    def send_state(state_indices, req, dst_info, notif):
        # _send_kvcache_generic, flat: per state buffer, one descriptor per run of slots.
        src_blocks, dst_blocks = group_concurrent_contiguous(np.asarray(state_indices), np.asarray(req["dst_state_indices"]))
        src_reqs, dst_reqs = [], []
        kind = bufs.state[0].kind
        src_dev, dst_dev = nixl_device_id(kind, bufs.gpu_id), nixl_device_id(kind, dst_info["gpu_id"])
        for src_ptr, dst_ptr, item_len in zip(bufs.ptrs(bufs.state), dst_info["state_ptrs"], STATE_LENS):
            for s, d in zip(src_blocks, dst_blocks):
                src_reqs.append((src_ptr + s[0] * item_len, item_len * len(s), src_dev))
                dst_reqs.append((dst_ptr + d[0] * item_len, item_len * len(s), dst_dev))
        src_descs = agent.get_xfer_descs(np.array(src_reqs, dtype=np.uint64), kind)
        dst_descs = agent.get_xfer_descs(np.array(dst_reqs, dtype=np.uint64), kind)
        h = agent.initialize_xfer("WRITE", src_descs, dst_descs, req["agent_name"], notif.encode("ascii"))
        check(bool(h), "KVSender failed to create transfer")
        state = agent.transfer(h)
        check(state != "ERR", f"KVSender failed to post transfer ({notif})")
        return h

    workers = [Worker(f"transfer worker {i}", transfer_worker, q) for i, q in enumerate(transfer_queues)]
    for w in workers:
        w.start()

    # The bootstrap thread: the decode peer's registration and the room's transfer infos.
    step("prefill: decode registration")
    decode_kv_args, transfer_infos = link.recv("register")

    def bootstrap():
        name = decode_kv_args["agent_name"]
        step("bootstrap: add_remote_agent(decode)")
        decode_kv_args_table[name] = decode_kv_args
        agent.add_remote_agent(decode_kv_args["agent_metadata"])
        step("bootstrap: _prepare_payload_xfer (source and destination lists)")
        # Both sides' KV is of one kind here (SGLang gets the decode side's in its registration).
        kind = bufs.kv[0].kind
        if "" not in prep:
            prep[""] = prep_equal_tp_dlist(agent, "", bufs.ptrs(bufs.kv), [ITEM] * len(bufs.kv), [b.size for b in bufs.kv],
                                           bufs.gpu_id, mem_kind=kind)
        prep[name] = prep_equal_tp_dlist(agent, name, decode_kv_args["kv_ptrs"], [ITEM] * len(bufs.kv),
                                         [ITEM * decode_kv_args["num_slots"]] * len(bufs.kv), decode_kv_args["gpu_id"],
                                         num_slots=decode_kv_args["num_slots"], mem_kind=kind)

    boot = Worker("bootstrap", bootstrap)
    boot.start()
    boot.join(WAIT_S)
    check(not boot.is_alive(), "the bootstrap thread hung")
    boot.reraise()
    step("prefill: the scheduler queues chunks")
    rooms = cfg["rooms"]
    for k in range(max(len(r["chunks"]) for r in rooms)):
        for r in rooms:
            if k < len(r["chunks"]):
                c = r["chunks"][k]
                transfer_queues[r["room"] % len(transfer_queues)].put(dict(
                    room=r["room"], prefill_kv_indices=c["prefill"], index_slice=c["slice"], is_last=k == len(r["chunks"]) - 1,
                    chunk_id=k, prefill_aux_index=r["prefill_aux"], state_indices=r["prefill_state"]))
    step("prefill: every room Success")
    deadline = time.monotonic() + WAIT_S
    while True:
        with lock:
            if exceptions:
                room, e = next(iter(exceptions.items()))
                raise e if isinstance(e, Failure) else Failure(f"transfer worker: room {room}", repr(e))
            if all(status.get(r["room"]) == "Success" for r in rooms):
                break
        if time.monotonic() > deadline:
            raise Failure("prefill: every room Success", f"statuses {status} after {WAIT_S:.0f} s")
        time.sleep(0.001)
    link.send("report", queue_size, params)
    link.recv("decode-done")


# ---- decode -------------------------------------------------------------------------------------


def decode(link, cfg):
    gpu = role_gpu(second=True)
    step("NixlKVManager(DECODE): the agent from the environment")
    agent, _, _ = make_agent("decode")
    bufs = Buffers(D_SLOTS, fill=False, gpu=gpu)
    bufs.register(agent)
    prefill_name = link.recv("prefill")[0]
    rooms = cfg["rooms"]
    register = dict(agent_name=agent.name, agent_metadata=agent.get_agent_metadata(), kv_ptrs=bufs.ptrs(bufs.kv),
                    aux_ptrs=bufs.ptrs(bufs.aux), state_ptrs=bufs.ptrs(bufs.state), gpu_id=bufs.gpu_id, decode_tp_size=1,
                    decode_tp_rank=0, dst_kv_item_len=ITEM, num_slots=D_SLOTS)
    transfer_infos = {r["room"]: dict(room=r["room"], agent_name=agent.name, dst_kv_indices=r["decode"],
                                      dst_aux_index=r["decode_aux"], dst_state_indices=r["decode_state"],
                                      required_dst_info_num=1) for r in rooms}
    link.send("register", register, transfer_infos)
    src = contents(P_SLOTS, fill=True)  # what the prefill side holds, to compare with
    expected = contents(D_SLOTS, fill=False)
    for r in rooms:
        for i in range(2 * LAYERS):
            exp, have = expected["kv"][i].reshape(D_SLOTS, ITEM), src["kv"][i].reshape(P_SLOTS, ITEM)
            exp[r["decode"]] = have[r["prefill_all"]]
        expected["aux"][0].reshape(AUX_SLOTS, -1)[r["decode_aux"]] = src["aux"][0].reshape(AUX_SLOTS, -1)[r["prefill_aux"]]
        for j in range(len(STATE_LENS)):
            expected["state"][j].reshape(STATE_SLOTS, -1)[r["decode_state"]] = src["state"][j].reshape(STATE_SLOTS, -1)[r["prefill_state"]]
    statuses = {r["room"]: dict(kvs=set(), last=None, aux=False, state=False) for r in rooms}
    by_room = {r["room"]: r for r in rooms}
    got, done = [], []
    step("decode: update_transfer_status until every room is done")
    deadline = time.monotonic() + WAIT_S
    while len(done) < len(rooms):
        for peer_name, messages in agent.get_new_notifs().items():
            for msg in messages:
                got.append((peer_name, bytes(msg)))
                components = bytes(msg).decode("ascii").split("_", 8)
                room = int(components[0])
                check(room in statuses, f"notification {short(msg)} for an unknown room")
                st = statuses[room]
                if components[1] == "kv":
                    chunk_id = int(components[2])
                    is_last = bool(int(components[3]))
                    pp_rank = int(components[4]) if len(components) > 4 else 0
                    check(pp_rank == ENGINE_RANK, f"{short(msg)}: rank {pp_rank}")
                    st["kvs"].add(chunk_id)
                    if is_last:
                        st["last"] = chunk_id
                elif components[1] == "aux":
                    st["aux"] = True
                elif components[1] == "state":
                    st["state"] = True
                else:
                    raise Failure(f"decode: room {room}", f"notification {short(msg)} of no kind known")
                if (room not in done and st["last"] is not None and st["kvs"] == set(range(st["last"] + 1))
                        and st["aux"] and (st["state"] or not by_room[room]["prefill_state"])):
                    done.append(room)
                    check_room(bufs.arrays(), expected, by_room[room])
        if time.monotonic() > deadline:
            raise Failure("decode: update_transfer_status", f"rooms done {len(done)} of {len(rooms)} after {WAIT_S:.0f} s: "
                          + str({k: v for k, v in statuses.items() if k not in done}))
        time.sleep(0.0005)
    step("decode: no notification more than once (0.3 s more)")
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        for peer_name, messages in agent.get_new_notifs().items():
            got.extend((peer_name, bytes(m)) for m in messages)
        time.sleep(0.01)
    step("decode: every notification exactly")
    want = []
    for r in rooms:
        n = len(r["chunks"])
        want += [(prefill_name, f"{r['room']}_kv_{k}_{int(k == n - 1)}_{ENGINE_RANK}".encode()) for k in range(n)]
        want.append((prefill_name, f"{r['room']}_aux".encode()))
        if r["prefill_state"]:
            want.append((prefill_name, f"{r['room']}_state_{ENGINE_RANK}".encode()))
    expect_exact(got, want, "the decode side's notifications")
    step("decode: every byte of every buffer (nothing else written)")
    now = bufs.arrays()
    for kind in ("kv", "aux", "state"):
        for i, (have, exp) in enumerate(zip(now[kind], expected[kind])):
            check(np.array_equal(have, exp), f"{kind} buffer {i} differs from what the rooms should have written")
    link.send("report", len(got))


def check_room(now, expected, r):
    step(f"decode: room {r['room']}: its bytes when its notifications are in")
    for i in range(2 * LAYERS):
        have, exp = now["kv"][i].reshape(D_SLOTS, ITEM), expected["kv"][i].reshape(D_SLOTS, ITEM)
        bad = [p for p in r["decode"] if not np.array_equal(have[p], exp[p])]
        check(not bad, f"kv region {i} pages {bad} lack their bytes")
    have, exp = now["aux"][0].reshape(AUX_SLOTS, -1), expected["aux"][0].reshape(AUX_SLOTS, -1)
    check(np.array_equal(have[r["decode_aux"]], exp[r["decode_aux"]]), f"aux slot {r['decode_aux']} lacks its bytes")
    for j in range(len(STATE_LENS)):
        have, exp = now["state"][j].reshape(STATE_SLOTS, -1), expected["state"][j].reshape(STATE_SLOTS, -1)
        check(np.array_equal(have[r["decode_state"]], exp[r["decode_state"]]), f"state buffer {j} lacks its bytes")


def make_rooms(seed, n_rooms):
    rng = np.random.default_rng(seed)
    p_free, d_free = list(rng.permutation(P_SLOTS)), list(rng.permutation(D_SLOTS))
    p_aux, d_aux = list(rng.permutation(AUX_SLOTS)), list(rng.permutation(AUX_SLOTS))
    p_state, d_state = list(rng.permutation(STATE_SLOTS)), list(rng.permutation(STATE_SLOTS))
    rooms = []
    for i in range(n_rooms):
        sizes = [int(x) for x in rng.integers(1, 5, size=int(rng.integers(1, 4)))]
        prefill_all = [int(p_free.pop()) for _ in range(sum(sizes))]
        decode_pages = [int(d_free.pop()) for _ in range(sum(sizes))]
        chunks, pos = [], 0
        for n in sizes:
            chunks.append(dict(prefill=prefill_all[pos : pos + n], slice=(pos, pos + n)))
            pos += n
        has_state = i % 2 == 0
        rooms.append(dict(room=int(rng.integers(1, 2**63 - 1)), chunks=chunks, prefill_all=prefill_all, decode=decode_pages,
                          prefill_aux=int(p_aux.pop()), decode_aux=int(d_aux.pop()),
                          prefill_state=[int(p_state.pop())] if has_state else [],
                          decode_state=[int(d_state.pop())] if has_state else []))
    return rooms


def disaggregation(seed, n_rooms):
    cfg = dict(rooms=make_rooms(seed, n_rooms))
    with run_roles(Role("prefill", prefill, cfg), Role("decode", decode, cfg)) as (P, D):
        step("bootstrap")
        (name,) = P.recv("meta")
        D.send("prefill", name)
        register = D.recv("register")
        P.send("register", *register)
        step("the rooms")
        queue_size, params = P.recv("report", timeout=2 * WAIT_S)
        (n,) = D.recv("report", timeout=2 * WAIT_S)
        P.send("decode-done")
        step("teardown")
        P.finish()
        D.finish()
    chunks = sum(len(r["chunks"]) for r in cfg["rooms"])
    return f"{n_rooms} rooms, {chunks} chunks over {queue_size} transfer threads, {n} notifications, parameters {params}"


def env_role(link):
    """The environment rules, in a process of their own: bad parameters are ValueErrors before
    any agent; a backend that is not there, or a parameter TCPX refuses, fails the manager."""
    step("env: SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS rules")
    base = {"SGLANG_DISAGGREGATION_NIXL_BACKEND": "TCPX"}
    check(nixl_env({}) == ("UCX", {}), f"defaults: {nixl_env({})}")
    check(nixl_env({**base, "SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS": '{"timeout_ms": "10000"}'})
          == ("TCPX", {"timeout_ms": "10000"}), "a JSON object of strings is taken")
    for bad in ('["timeout_ms"]', '{"timeout_ms": 10000}', '"x"', "{}{}", "not json"):
        try:
            nixl_env({**base, "SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS": bad})
        except ValueError:  # json.JSONDecodeError is a ValueError too
            continue
        raise Failure("env: SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS rules", f"parameters {bad!r} were taken")
    step("env: a backend with no plugin")
    try:
        make_agent("decode", {"SGLANG_DISAGGREGATION_NIXL_BACKEND": "NO_SUCH_BACKEND"})
    except Exception as e:
        link.send("missing", f"{type(e).__name__}")
    else:
        raise Failure("env: a backend with no plugin", "NO_SUCH_BACKEND was created")
    step("env: TCPX with a bad parameter value")
    try:
        make_agent("prefill", {"SGLANG_DISAGGREGATION_NIXL_BACKEND": "TCPX",
                               "SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS": '{"num_channels": "many"}'})
    except Exception as e:
        link.send("bad-param", f"{type(e).__name__}")
    else:
        raise Failure("env: TCPX with a bad parameter value", "num_channels=many was taken")


def env_checks():
    with run_roles(Role("env", env_role)) as (E,):
        (missing,) = E.recv("missing")
        (bad,) = E.recv("bad-param")
        E.finish()
    return f"bad parameters: ValueError; no plugin: {missing}; num_channels=many: {bad}"


SCENARIOS = [
    ("env", env_checks),
    ("disaggregation", lambda: disaggregation(7, 16)),
]

if __name__ == "__main__":
    harness_main("sglang", SCENARIOS, env={
        "SGLANG_DISAGGREGATION_NIXL_BACKEND": "TCPX",
        "SGLANG_DISAGGREGATION_NIXL_BACKEND_PARAMS": '{"timeout_ms": "10000"}',
        "SGLANG_DISAGGREGATION_QUEUE_SIZE": "4",
    })
