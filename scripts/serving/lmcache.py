#!/usr/bin/env python3
"""LMCache's PD mode (PDBackend over NixlChannel) on our NIXL backend TCPX, on host memory (DRAM)
or, with --vram, GPU memory as LMCache has it (VRAM, named "cuda"): the sender (prefiller) in one
process, the receiver (decoder) in another.

Follows LMCache/LMCache lmcache/v1/transfer_channel/nixl_channel.py @ f5177bdc3c49
(NixlAgentWrapper, NixlChannel.lazy_init_peer_connection, _init_loop, batched_write, close) and
lmcache/v1/storage_backend/pd_backend.py @ b532e04ac3f8 (_ensure_peer_connection,
_remote_allocate, batched_submit_put_task, _allocate_and_put); NIXL's Python agent:
ai-dynamo/nixl src/api/python/_api.py @ 8770b655a6b1.

As LMCache does it: nixl_agent(str(uuid4()), nixl_agent_config(backends=["TCPX"])) (NIXL creates
TCPX with `{}`, nixl_backends: [TCPX] in LMCache's config); one buffer registered,
get_reg_descs([(ptr, size, tp_rank, "")], mem_type=...) + register_memory; the local list one
descriptor per page, get_xfer_descs + prep_xfer_dlist("", ..., mem_type=...) once. LMCache writes
mem_type="cuda" (NIXL's old name for VRAM) and its tp_rank as the device id; this harness does so
under --vram, the GPU's index for tp_rank, and on host memory writes the old name for DRAM, "cpu",
and 0. Peer set-up in two rounds, as _init_loop insists: metadata both ways
(add_remote_agent on each side), then the receiver's get_serialized_descs of its page list, which
the sender deserialize_descs and prep_xfer_dlist(remote_name, ...) once per peer. Each put: the
sender asks the receiver to allocate pages for the request's chunk keys (keys it already holds
come back as already sent and are not written), then make_prepped_xfer("WRITE", local, pages,
remote, remote_pages) with no notification, transfer(), check_xfer_state every 1 ms until DONE
("ERR" raises); completion goes out of band (to the proxy). close(): deregister_memory and
release_dlist_handle of both lists.

Here instead: ZMQ REQ/REP and PUSH (msgspec) are pipes through the driver, which plays the proxy
and then asks the receiver to check the request's pages; MemoryObj pages are numpy page indices.
Checked: every byte of every page the receiver holds for a key, after the proxy notice; no other
page written; keys already held are not sent again.

usage: lmcache.py [--path network|same-host] [--vram I,T] [SCENARIO ...]
"""

import time
import uuid

import numpy as np

from common import (
    WAIT_S, Failure, Role, alloc, check, harness_main, nixl_agent, nixl_agent_config, pattern, role_gpu, run_roles,
    step,
)

PAGE = 64 * 1024  # align_bytes: one chunk's KV
PAGES = 48
MEM = {"VRAM": "cuda", "DRAM": "cpu"}  # NIXL's old names, LMCache's "cuda" and its host-memory twin


def chunk_bytes(key):
    """The KV of chunk `key` (its content on the sender)."""
    return pattern(PAGE, 7000 + int(key.rsplit("@", 1)[1]))


class NixlAgentWrapper:
    def __init__(self, role, buffer_ptr, buffer_size, page_size, tp_rank, backends, mem_type):
        step(f"{role}: NixlAgentWrapper: nixl_agent(uuid4, nixl_agent_config(backends={backends}))")
        self.agent = nixl_agent(str(uuid.uuid4()), nixl_agent_config(backends=backends))
        check("TCPX" in self.agent.backends, f"the agent made no TCPX backend (plugins: {self.agent.get_plugin_list()})")
        step(f"{role}: NixlAgentWrapper: register the buffer")
        memory_desc = [(buffer_ptr, buffer_size, tp_rank, "")]
        self.reg_descs = self.agent.get_reg_descs(memory_desc, mem_type=mem_type)
        self.agent.register_memory(self.reg_descs)
        step(f"{role}: NixlAgentWrapper: the page list")
        xfer_desc = [(base, page_size, tp_rank) for base in range(buffer_ptr, buffer_ptr + buffer_size, page_size)]
        self.xfer_descs = self.agent.get_xfer_descs(xfer_desc, mem_type=mem_type)
        self.xfer_handler = self.agent.prep_xfer_dlist("", self.xfer_descs, mem_type=mem_type)

    def close(self, remote_handlers=()):
        self.agent.deregister_memory(self.reg_descs)
        self.agent.release_dlist_handle(self.xfer_handler)
        for h in remote_handlers:
            self.agent.release_dlist_handle(h)


def channel(role, gpu):
    """The role's buffer and its NixlAgentWrapper; LMCache's tp_rank (the device id it registers)
    is the GPU's index here."""
    buf = alloc(PAGES * PAGE, gpu)
    return buf, NixlAgentWrapper(role, buf.addr, buf.size, PAGE, buf.dev, ["TCPX"], MEM[buf.kind])


def receiver(link, cfg):
    buf, w = channel("receiver", role_gpu(second=True))
    free = [int(p) for p in np.random.default_rng(cfg["seed"]).permutation(PAGES)]
    data = {}  # key -> page (PDBackend.data)
    local_meta = w.agent.get_agent_metadata()
    written = set()
    while True:
        step("receiver: waiting for a request")
        tag, payload = link.next(2 * WAIT_S)
        if tag == "init":
            step("receiver: _init_loop: NixlInitRequest")
            w.agent.add_remote_agent(payload[0])
            link.send("init-resp", local_meta)
        elif tag == "memreg":
            step("receiver: _init_loop: NixlMemRegRequest")
            link.send("memreg-resp", w.agent.get_serialized_descs(w.xfer_descs))
        elif tag == "alloc":
            step("receiver: _allocate_and_put")
            (keys,) = payload
            already, remote_indexes = [], []
            for idx, key in enumerate(keys):
                if key in data:
                    already.append(idx)
                    continue
                check(free, "out of pages")
                page = free.pop()
                remote_indexes.append(page)
                data[key] = page
            link.send("alloc-resp", already, remote_indexes)
        elif tag == "check":
            (req_id, keys) = payload
            step(f"receiver: the pages of {req_id}")
            view = buf.read(0, buf.size).reshape(PAGES, PAGE)
            for key in keys:
                check(key in data, f"{req_id}: no page for {key}")
                check(np.array_equal(view[data[key]], chunk_bytes(key)), f"{req_id}: page {data[key]} of {key} lacks its bytes")
                written.add(data[key])
            untouched = [p for p in range(PAGES) if p not in set(data.values())]
            check(not view[untouched].any(), "a page no key was given got written")
            link.send("checked")
        elif tag == "close":
            break
        else:
            raise Failure("receiver", f"unexpected message {tag}")
    step("receiver: close")
    w.close()


def sender(link, cfg):
    buf, w = channel("sender", role_gpu())
    agent = w.agent
    # The prefiller's chunks: each key's KV in a page of the sender's buffer (MemoryObj address).
    pages = {}
    free = [int(p) for p in np.random.default_rng(cfg["seed"] + 1).permutation(PAGES)]
    remote_handlers = {}
    receiver_id = "127.0.0.1" + "55555"
    sent_pages = 0
    for req in cfg["requests"]:
        keys = req["keys"]
        for key in keys:
            if key not in pages:
                pages[key] = free.pop()
                buf.write(pages[key] * PAGE, chunk_bytes(key))
        if receiver_id not in remote_handlers:
            # _ensure_peer_connection -> lazy_init_peer_connection
            step("sender: lazy_init_peer_connection: metadata")
            link.send("init", agent.get_agent_metadata())
            (remote_meta_bytes,) = link.recv("init-resp")
            remote_agent_name = agent.add_remote_agent(remote_meta_bytes)
            step("sender: lazy_init_peer_connection: the receiver's page list")
            link.send("memreg")
            (remote_xfer_dlist_bytes,) = link.recv("memreg-resp")
            remote_xfer_dlist = agent.deserialize_descs(remote_xfer_dlist_bytes)
            remote_handlers[receiver_id] = agent.prep_xfer_dlist(remote_agent_name, remote_xfer_dlist)
        step(f"sender: {req['req_id']}: _remote_allocate")
        link.send("alloc", keys)
        already, remote_indexes = link.recv("alloc-resp")
        to_send = [k for i, k in enumerate(keys) if i not in already]
        check(already == req["already"], f"{req['req_id']}: already sent {already}, expected {req['already']}")
        if to_send:
            step(f"sender: {req['req_id']}: batched_write of {len(to_send)} pages")
            handle = agent.make_prepped_xfer("WRITE", w.xfer_handler, [pages[k] for k in to_send],
                                             remote_handlers[receiver_id], remote_indexes)
            agent.transfer(handle)
            wait_time = 0.001
            deadline = time.monotonic() + WAIT_S
            while True:
                status = agent.check_xfer_state(handle)
                if status == "ERR":
                    raise Failure(f"sender: {req['req_id']}: batched_write", "Failed to send data to remote peer (ERR)")
                elif status == "PROC":
                    if time.monotonic() > deadline:
                        raise Failure(f"sender: {req['req_id']}: batched_write", f"still PROC after {WAIT_S:.0f} s (hang)")
                    time.sleep(wait_time)
                    continue
                check(status == "DONE", f"Transfer status is {status}, expected DONE")
                break
            sent_pages += len(to_send)
        if req["is_last_prefill"]:
            step(f"sender: {req['req_id']}: ProxyNotif")
            link.send("proxy", req["req_id"], keys)
            link.recv("proxy-ack")
    step("sender: close")
    w.close(remote_handlers.values())
    link.send("report", sent_pages)


def pd(seed):
    keys = [f"chunk@{i}" for i in range(20)]
    requests = [
        dict(req_id="req-a", keys=keys[0:6], already=[], is_last_prefill=True),
        # A second turn of the same prompt: the first 6 chunks are there already.
        dict(req_id="req-b", keys=keys[0:6] + keys[6:9], already=list(range(6)), is_last_prefill=True),
        # All there: no transfer, only the proxy notice.
        dict(req_id="req-c", keys=keys[0:3], already=[0, 1, 2], is_last_prefill=True),
        # A long prompt in two puts, the proxy told after the last.
        dict(req_id="req-d", keys=keys[9:15], already=[], is_last_prefill=False),
        dict(req_id="req-d", keys=keys[15:20], already=[], is_last_prefill=True),
    ]
    cfg = dict(seed=seed, requests=requests)
    with run_roles(Role("receiver", receiver, cfg), Role("sender", sender, cfg)) as (R, S):
        pending_keys = []
        while True:
            step("relay: the sender's next message")
            tag, payload = S.link.next(2 * WAIT_S)
            step(f"relay: the sender's {tag!r}")
            if tag == "init":
                R.send("init", *payload)
                S.send("init-resp", *R.recv("init-resp"))
            elif tag == "memreg":
                R.send("memreg")
                S.send("memreg-resp", *R.recv("memreg-resp"))
            elif tag == "alloc":
                R.send("alloc", *payload)
                S.send("alloc-resp", *R.recv("alloc-resp"))
            elif tag == "proxy":
                req_id, keys_of_put = payload
                step(f"proxy: {req_id} prefilled; the receiver checks its pages")
                pending_keys += keys_of_put
                R.send("check", req_id, [k for r in requests if r["req_id"] == req_id for k in r["keys"]])
                R.recv("checked")
                S.send("proxy-ack")
            elif tag == "report":
                (sent_pages,) = payload
                break
            else:
                raise Failure("relay", f"unexpected message {tag} from the sender")
        R.send("close")
        step("teardown")
        S.finish()
        R.finish()
    expected_pages = len(set(k for r in requests for k in r["keys"]))
    check(sent_pages == expected_pages, f"{sent_pages} pages written, expected {expected_pages} (keys held already are not sent)")
    return f"{len(requests)} puts, {sent_pages} pages of {PAGE // 1024} KiB"


SCENARIOS = [("pd", lambda: pd(11))]

if __name__ == "__main__":
    harness_main("lmcache", SCENARIOS)
