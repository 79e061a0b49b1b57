#!/usr/bin/env python3
"""Disaggregated prefill and decode of a Llama-architecture model from `transformers`, the prompt's
KV cache pulled from the prefill process into the decode process over NIXL (our TCPX backend, then
NIXL's UCX), checked against one process generating alone.

  reference  one process: prefill of the prompt, then greedy decoding (DynamicCache); its tokens
             and time to first token
  prefill    GPU 0 (or the CPU): the same prefill, its K and V written into a paged KV cache laid
             out as vLLM's with the HND layout: per layer one (2, num_blocks, kv_heads, 16,
             head_dim) tensor, K and V registered with NIXL as two regions (2 x layers regions),
             the prompt's blocks taken from a shuffled block table; it hands the decode process its
             agent's metadata, its block ids, the first token and the prompt's length
  decode     GPU 1 (or the CPU): its own paged cache and block table; descriptors one per (region,
             block), each side's list prepared once (prep_xfer_dlist), the prompt's blocks pulled
             with one make_prepped_xfer("READ", ..., notif_msg=...), as vLLM's NixlConnector does;
             then a DynamicCache rebuilt from its blocks and greedy decoding from the first token

Weights come from a fixed seed (no download), the same in every process. The decode process
compares its tokens, and a digest of the K and V it rebuilt, with the reference's; any difference
exits non-zero. It also times the pull against one descriptor of the same bytes between the same
two agents (one contiguous buffer on each side), the pull's overhead for being cut into blocks.

Agents are made as vLLM makes one for a backend other than UCX: nixl_agent(uuid,
nixl_agent_config(backends=[BACKEND])); NIXL_PLUGIN_DIR must name a folder holding our plugin
(`uccl-tcpx-nixl-plugin-dir` makes one). Both processes run on this host; TCPX takes its same-host
path, or with UCCL_TCPX_DISABLE_IPC=1 (--paths network) the path agents on two hosts take.
The processes, pipes and bounded waits are those of scripts/serving/common.py.

usage: disagg.py [--device cpu|cuda] [--config tiny|1b] [--prompt-tokens N] [--new-tokens M]
                 [--backends TCPX,UCX] [--paths same-host,network] [--rounds R] [--seed S]
"""

import argparse
import hashlib
import inspect
import os
import sys
import time
import uuid

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts", "serving"))
# Building the 1b model and its first CUDA calls take longer than the harnesses' bounds.
os.environ.setdefault("SERVING_WAIT_S", "300")
os.environ.setdefault("SERVING_HANG_S", "1200")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

from common import (  # noqa: E402
    WAIT_S, Failure, Role, check, nixl_agent, nixl_agent_config, run_roles, step, wait_done,
)

BLOCK = 16  # tokens a block, vLLM's default
CONFIGS = {
    "tiny": dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    # About 0.86 B parameters: TinyLlama's widths, 16 layers, Llama-3's 8 KV heads.
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
}
PATHS = {"same-host": "0", "network": "1"}


# ---- the model --------------------------------------------------------------------------------


def setup_torch(opts, gpu):
    """torch, and the device this process computes on. On CUDA the GPU is made current before the
    agent exists: a TCPX engine created without a `gpu` option serves the current GPU."""
    import torch

    if opts.device == "cuda":
        torch.cuda.set_device(gpu)
        return torch, torch.device("cuda", gpu)
    return torch, torch.device("cpu")


def build_model(torch, opts, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range above Llama's 0.02: with 0.02 a random model repeats two tokens whatever its
    # cache holds, so equal tokens would say little about the KV that came over.
    config = LlamaConfig(**CONFIGS[opts.config], initializer_range=0.1,
                         max_position_embeddings=max(4096, opts.prompt_tokens + opts.new_tokens))
    config._attn_implementation = "sdpa"
    torch.manual_seed(opts.seed)
    # Built in float32 on the CPU in every process, so all get the same weights whatever the device.
    model = LlamaForCausalLM(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), config


def make_prompt(torch, opts, vocab, device):
    g = torch.Generator().manual_seed(opts.seed + 1)
    return torch.randint(0, vocab, (1, opts.prompt_tokens), generator=g).to(device)


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_kw(model):
    """transformers 5.x names the forward's cache `cache`, earlier ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(torch, model, prompt):
    """(first token, DynamicCache). The same call in the reference and the prefill process, so both
    run the same kernels on the same shapes."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax()), out[cache_kw(model)]


def greedy(torch, model, cache, first, steps, device):
    toks, kw = [first], cache_kw(model)
    with torch.inference_mode():
        for _ in range(steps):
            out = model(input_ids=torch.tensor([[toks[-1]]], device=device), use_cache=True, **{kw: cache})
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


def layer_kv(cache, layer):
    """Layer `layer`'s K and V, each (1, kv_heads, tokens, head_dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def new_cache(kvs):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kvs):
        cache.update(k, v, layer)
    return cache


def kv_digest(torch, kvs):
    h = hashlib.sha256()
    for k, v in kvs:
        for t in (k, v):
            h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


# ---- the paged KV cache -------------------------------------------------------------------------


class PagedKV:
    """Per layer one (2, num_blocks, kv_heads, BLOCK, head_dim) tensor (vLLM's FlashAttention cache
    with the HND layout, which vLLM's NixlConnector asks for), registered as one region for K and
    one for V, layer-major, as vLLM's register_kv_caches splits it (vllm-project/vllm
    vllm/distributed/kv_transfer/kv_connector/v1/nixl/base_worker.py @ 00bd51312724)."""

    def __init__(self, torch, config, num_blocks, dtype, device):
        self.torch, self.num_blocks, self.device = torch, num_blocks, device
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        shape = (2, num_blocks, self.kv_heads, BLOCK, self.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.regions = [t[i] for t in self.layers for i in (0, 1)]
        self.block_len = self.kv_heads * BLOCK * self.head_dim * self.layers[0].element_size()
        self.mem = "VRAM" if device.type == "cuda" else "DRAM"
        self.dev = device.index if device.type == "cuda" else 0

    def reg_list(self):
        return [(r.data_ptr(), self.num_blocks * self.block_len, self.dev, "") for r in self.regions]

    def bases(self):
        return [r.data_ptr() for r in self.regions]

    def write(self, cache, block_ids, tokens):
        """The prompt's K and V into blocks `block_ids` (the last one padded with zeros)."""
        torch = self.torch
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        pad = len(block_ids) * BLOCK - tokens
        for layer, t in enumerate(self.layers):
            for i, x in enumerate(layer_kv(cache, layer)):
                x = torch.nn.functional.pad(x[0], (0, 0, 0, pad))  # (kv_heads, blocks * BLOCK, head_dim)
                t[i][ids] = x.view(self.kv_heads, len(block_ids), BLOCK, self.head_dim).transpose(0, 1)

    def read(self, block_ids, tokens):
        """[(K, V)] per layer, each (1, kv_heads, tokens, head_dim), from blocks `block_ids`."""
        ids = self.torch.tensor(block_ids, dtype=self.torch.long, device=self.device)
        out = []
        for t in self.layers:
            pair = []
            for i in (0, 1):
                x = t[i][ids].transpose(0, 1).reshape(self.kv_heads, len(block_ids) * BLOCK, self.head_dim)
                pair.append(x[:, :tokens].unsqueeze(0).contiguous())
            out.append(tuple(pair))
        return out


def block_descs(bases, num_blocks, block_len, dev):
    """(addr, len, dev) rows, one per (region, block), region-major: descriptor id = region *
    num_blocks + block, as vLLM numbers them."""
    offs = np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_len)
    rows = np.empty((len(bases) * num_blocks, 3), dtype=np.uint64)
    rows[:, 0] = np.concatenate([np.uint64(b) + offs for b in bases])
    rows[:, 1] = block_len
    rows[:, 2] = dev
    return rows


def desc_ids(block_ids, num_blocks, regions):
    return (np.arange(regions)[:, None] * num_blocks + np.asarray(list(block_ids))[None, :]).flatten()


def block_table(seed, num_blocks, n):
    """n block ids of a cache of num_blocks, shuffled, so a prompt's blocks are not contiguous."""
    return [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)[:n]]


def make_agent(role, backend):
    """(agent, None), or (None, why) where this NIXL cannot make `backend`."""
    step(f"{role}: nixl_agent(uuid4, nixl_agent_config(backends=[{backend!r}]))")
    try:
        agent = nixl_agent(str(uuid.uuid4()), nixl_agent_config(backends=[backend]))
    except Exception as e:  # a plugin whose backend fails to start (no usable device, say)
        return None, f"nixl_agent failed: {e}"
    if backend not in agent.backends:
        plugins = agent.get_plugin_list()
        if backend not in plugins:
            return None, (f"this NIXL has no {backend} plugin (plugins: {', '.join(sorted(plugins))}; "
                          f"NIXL_PLUGIN_DIR={os.environ.get('NIXL_PLUGIN_DIR')})")
        return None, f"NIXL could not create its {backend} backend (its log above says why)"
    return agent, None


def register(agent, backend, paged, flat):
    """The paged cache's regions and the one-descriptor buffer: the descriptor lists registered."""
    out = []
    for regs in (paged.reg_list(), flat):
        descs = agent.get_reg_descs(regs, paged.mem)
        agent.register_memory(descs, backends=[backend])
        out.append(descs)
    return out


def sizes(opts):
    blocks = -(-opts.prompt_tokens // BLOCK)
    # Different sizes on the two sides, as two engines' caches are: descriptor ids differ too.
    return blocks, 2 * blocks + 3, 2 * blocks + 11


# ---- the three processes ------------------------------------------------------------------------


def reference_role(link, opts):
    step("reference: the model")
    torch, device = setup_torch(opts, opts.gpus[0])
    model, config = build_model(torch, opts, device)
    prompt = make_prompt(torch, opts, config.vocab_size, device)
    step("reference: warm-up")
    first, cache = prefill(torch, model, prompt)
    greedy(torch, model, cache, first, 1, device)
    sync(torch, device)
    step("reference: prefill and greedy decoding")
    ttfts = []
    for _ in range(opts.rounds):
        start = time.perf_counter()
        first, cache = prefill(torch, model, prompt)
        ttfts.append(time.perf_counter() - start)
    ttft = float(np.median(ttfts))
    kv_sha = kv_digest(torch, [layer_kv(cache, layer) for layer in range(config.num_hidden_layers)])
    start = time.perf_counter()
    tokens = greedy(torch, model, cache, first, opts.new_tokens - 1, device)
    decode_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    link.send("reference", dict(tokens=tokens, ttft=ttft, decode_s=decode_s, kv_sha=kv_sha, params=params,
                                layers=config.num_hidden_layers, dtype=str(next(model.parameters()).dtype)))


def prefill_role(link, opts, backend):
    torch, device = setup_torch(opts, opts.gpus[0])
    agent, why = make_agent("prefill", backend)
    if agent is None:
        link.send("meta", dict(skip=why))
        return
    step("prefill: the model")
    model, config = build_model(torch, opts, device)
    prompt = make_prompt(torch, opts, config.vocab_size, device)
    blocks, p_blocks, _ = sizes(opts)
    step("prefill: warm-up")
    prefill(torch, model, prompt)
    sync(torch, device)

    step("prefill: register the paged KV cache and the one-descriptor buffer")
    paged = PagedKV(torch, config, p_blocks, next(model.parameters()).dtype, device)
    nbytes = blocks * paged.block_len * len(paged.regions)
    flat = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    registered = register(agent, backend, paged, [(flat.data_ptr(), nbytes, paged.dev, "")])
    link.send("meta", dict(agent_metadata=agent.get_agent_metadata(), name=agent.name, bases=paged.bases(),
                           num_blocks=p_blocks, block_len=paged.block_len, dev=paged.dev, flat=flat.data_ptr(),
                           flat_len=nbytes))

    # The request comes once the decode side is connected and idle, so that the prefill has the
    # host to itself, as the reference had.
    link.recv("go")
    step("prefill: the request")
    my_blocks = block_table(opts.seed + 2, p_blocks, blocks)
    times = []
    for _ in range(opts.rounds):  # the same blocks rewritten with the same bytes each time
        sync(torch, device)
        start = time.perf_counter()
        first, cache = prefill(torch, model, prompt)
        paged.write(cache, my_blocks, opts.prompt_tokens)
        sync(torch, device)
        times.append(time.perf_counter() - start)
    prefill_s = float(np.median(times))
    link.send("request", dict(block_ids=my_blocks, first=first, prompt_len=opts.prompt_tokens, prefill_s=prefill_s))

    # Its blocks stay untouched until the decode side is done; meanwhile each engine step reads the
    # notifications, as vLLM's get_finished does.
    step("prefill: notifications, until the decode side is done")
    got = []
    while True:
        for _, msgs in agent.get_new_notifs().items():
            got.extend(bytes(m).decode() for m in msgs)
        sent = link.poll("finish")
        if sent is not None:
            break
        time.sleep(0.001)
    deadline = time.monotonic() + WAIT_S
    while sorted(got) != sorted(sent[0]) and time.monotonic() < deadline:
        for _, msgs in agent.get_new_notifs().items():
            got.extend(bytes(m).decode() for m in msgs)
        time.sleep(0.001)
    check(sorted(got) == sorted(sent[0]), f"notifications: got {sorted(got)}, expected {sorted(sent[0])}")
    step("prefill: deregister")
    for descs in registered:
        agent.deregister_memory(descs, backends=[backend])


def decode_role(link, opts, backend):
    torch, device = setup_torch(opts, opts.gpus[1])
    agent, why = make_agent("decode", backend)
    if agent is None:
        link.send("meta", dict(skip=why))
        return
    step("decode: the model")
    model, config = build_model(torch, opts, device)
    # Decoding over a cache of the prompt's length, once, as the reference warms up: the kernels
    # for these shapes are loaded before anything is timed.
    step("decode: warm-up")
    warm = torch.zeros((1, opts.prompt_tokens), dtype=torch.long, device=device)
    greedy(torch, model, prefill(torch, model, warm)[1], 0, 1, device)
    sync(torch, device)

    blocks, p_blocks, d_blocks = sizes(opts)
    step("decode: register the paged KV cache and the one-descriptor buffer")
    paged = PagedKV(torch, config, d_blocks, next(model.parameters()).dtype, device)
    nbytes = blocks * paged.block_len * len(paged.regions)
    flat = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    registered = register(agent, backend, paged, [(flat.data_ptr(), nbytes, paged.dev, "")])
    link.send("meta", dict(ok=True))

    (meta,) = link.recv("remote")
    step("decode: add_remote_agent and the prepared lists")
    peer = agent.add_remote_agent(meta["agent_metadata"])
    check(peer in (meta["name"], meta["name"].encode()), f"add_remote_agent named the peer {peer!r}")
    local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", agent.get_xfer_descs(
        block_descs(paged.bases(), d_blocks, paged.block_len, paged.dev), paged.mem))
    remote = agent.prep_xfer_dlist(peer, agent.get_xfer_descs(
        block_descs(meta["bases"], meta["num_blocks"], meta["block_len"], meta["dev"]), paged.mem))
    check(meta["flat_len"] == nbytes, f"the prefill side's buffer is {meta['flat_len']} B, ours {nbytes} B")
    flat_local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", agent.get_xfer_descs([(flat.data_ptr(), nbytes, paged.dev)], paged.mem))
    flat_remote = agent.prep_xfer_dlist(peer, agent.get_xfer_descs([(meta["flat"], nbytes, meta["dev"])], paged.mem))
    sent, makes = [], []

    def read(local_h, local_ids, remote_h, remote_ids, notif):
        """One READ with its notification, timed from make_prepped_xfer to DONE; the make's own
        time (NIXL's and the backend's work per descriptor, before any byte moves) goes to `makes`."""
        start = time.perf_counter()
        handle = agent.make_prepped_xfer("READ", local_h, local_ids, remote_h, remote_ids, notif_msg=notif.encode())
        makes.append(time.perf_counter() - start)
        agent.transfer(handle)
        wait_done(agent, handle, notif)
        took = time.perf_counter() - start
        agent.release_xfer_handle(handle)
        sent.append(notif)
        return took

    # Connections are up, and each path's first-use costs paid, before a serving system's first
    # request: untimed READs of each shape set them up here (UCX makes its endpoints at the first
    # transfer; TCPX loads its gather kernel at the first staged READ of small blocks). The
    # paged one reads blocks 0.. before the prefill has written any; the request's READ then
    # overwrites whichever of them it uses.
    step("decode: warm-up READs")
    regions = len(paged.regions)
    read(flat_local, [0], flat_remote, [0], "warm-up-0:1")
    read(local, desc_ids(range(blocks), d_blocks, regions), remote,
         desc_ids(range(blocks), meta["num_blocks"], regions), "warm-up-1:1")
    link.send("ready")

    (req,) = link.recv("request")
    check(req["prompt_len"] == opts.prompt_tokens and len(req["block_ids"]) == blocks, f"request {req}")
    my_blocks = block_table(opts.seed + 3, d_blocks, blocks)
    local_ids = desc_ids(my_blocks, d_blocks, regions)
    remote_ids = desc_ids(req["block_ids"], meta["num_blocks"], regions)
    step(f"decode: READ of {len(local_ids)} blocks")
    pull_s = read(local, local_ids, remote, remote_ids, "req-0:1")
    sync(torch, device)

    step("decode: DynamicCache from the paged blocks, greedy decoding")
    kvs = paged.read(my_blocks, opts.prompt_tokens)
    kv_sha = kv_digest(torch, kvs)
    start = time.perf_counter()
    tokens = greedy(torch, model, new_cache(kvs), req["first"], opts.new_tokens - 1, device)
    decode_s = time.perf_counter() - start

    # The same READ again, and one descriptor of its bytes, in turns, so load changes hit both.
    step("decode: the pull against one descriptor of its bytes")
    pulls, ones, pull_makes = [], [], []
    for i in range(opts.rounds):
        pulls.append(read(local, local_ids, remote, remote_ids, f"req-{i + 1}:1"))
        pull_makes.append(makes[-1])
        ones.append(read(flat_local, [0], flat_remote, [0], f"one-{i}:1"))
    check(kv_digest(torch, paged.read(my_blocks, opts.prompt_tokens)) == kv_sha, "the KV read again differs from the first READ's")
    link.send("result", dict(tokens=tokens, kv_sha=kv_sha, pull_s=pull_s, prefill_s=req["prefill_s"], decode_s=decode_s,
                             pulls=pulls, pull_makes=pull_makes, ones=ones, descs=len(local_ids), block_len=paged.block_len, nbytes=nbytes,
                             sent=sent))
    link.recv("done")
    step("decode: release, remove the peer, deregister")
    for h in (local, remote, flat_local, flat_remote):
        agent.release_dlist_handle(h)
    agent.remove_remote_agent(peer)
    for descs in registered:
        agent.deregister_memory(descs, backends=[backend])


# ---- the driver ---------------------------------------------------------------------------------


def ms(s):
    return f"{s * 1e3:.2f} ms"


def size(n):
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.4g} {unit}"
    return f"{n} B"


def run_one(opts, backend, path, ref):
    """One prefill and one decode process over `backend`: a result row, or None if skipped."""
    if path is not None:
        os.environ["UCCL_TCPX_DISABLE_IPC"] = PATHS[path]
    where = f"{backend}" + (f", {path} path (UCCL_TCPX_DISABLE_IPC={PATHS[path]})" if path else "")
    print(f"== {where}", flush=True)
    with run_roles(Role("prefill", prefill_role, opts, backend), Role("decode", decode_role, opts, backend)) as (P, D):
        step("the agents' metadata")
        (pmeta,) = P.recv("meta")
        (dmeta,) = D.recv("meta")
        why = pmeta.get("skip") or dmeta.get("skip")
        if why:
            print(f"{backend} skipped: {why}", flush=True)
            return None
        D.send("remote", pmeta)
        D.recv("ready")
        P.send("go")
        step("the request")
        (req,) = P.recv("request")
        D.send("request", req)
        (res,) = D.recv("result")
        P.send("finish", res["sent"])
        P.finish()
        D.send("done")
        D.finish()
    same = res["tokens"] == ref["tokens"]
    kv_same = res["kv_sha"] == ref["kv_sha"]
    pull, one = float(np.median(res["pulls"])), float(np.median(res["ones"]))
    make = float(np.median(res["pull_makes"]))
    regions = 2 * ref["layers"]
    print(f"tokens equal to one process generating alone: {'yes' if same else 'NO'} {res['tokens']}", flush=True)
    if not same:
        print(f"  one process alone:                            {ref['tokens']}", flush=True)
    print(f"KV bytes equal to the prefill's: {'yes' if kv_same else 'NO'} (sha256 {res['kv_sha'][:16]})", flush=True)
    print(f"time to first token: {ms(res['prefill_s'] + res['pull_s'])} with the KV pull "
          f"(prefill {ms(res['prefill_s'])} + pull {ms(res['pull_s'])}); one process alone {ms(ref['ttft'])}", flush=True)
    print(f"then {opts.new_tokens - 1} tokens in {ms(res['decode_s'])} (one process alone {ms(ref['decode_s'])})", flush=True)
    print(f"KV pull: {regions} regions x {res['descs'] // regions} blocks = {res['descs']} descriptors of "
          f"{size(res['block_len'])}, {size(res['nbytes'])}: median {ms(pull)} of {len(res['pulls'])}; one descriptor "
          f"of the same bytes: median {ms(one)}; ratio {pull / one:.2f}", flush=True)
    print(f"  of the pull, make_prepped_xfer: median {ms(make)}; the rest (post to DONE) over one descriptor: "
          f"{(pull - make) / one:.2f}", flush=True)
    return dict(where=f"{backend} {path or ''}".strip(), same=same, kv_same=kv_same, ttft_pd=res["prefill_s"] + res["pull_s"],
                prefill=res["prefill_s"], pull=res["pull_s"], pull_med=pull, make=make, one=one)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default: tiny on cpu, 1b on cuda")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default: 64 for tiny, 2048 for 1b")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--backends", default="TCPX,UCX")
    ap.add_argument("--paths", default="same-host,network", help="TCPX's paths between the two processes")
    ap.add_argument("--rounds", type=int, default=5, help="timed pulls and one-descriptor READs, in turns")
    ap.add_argument("--gpus", default="0,1", help="prefill,decode GPUs (cuda)")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    opts.config = opts.config or ("1b" if opts.device == "cuda" else "tiny")
    opts.prompt_tokens = opts.prompt_tokens or (2048 if opts.config == "1b" else 64)
    opts.gpus = [int(g) for g in opts.gpus.split(",")]
    paths = opts.paths.split(",")
    for p in paths:
        if p not in PATHS:
            ap.error(f"--paths: {p} is not one of {', '.join(PATHS)}")
    if opts.new_tokens < 1 or opts.rounds < 1 or len(opts.gpus) != 2:
        ap.error("--new-tokens and --rounds take at least 1, --gpus two GPUs")
    if not os.environ.get("NIXL_PLUGIN_DIR"):
        print("disagg.py: NIXL_PLUGIN_DIR is not set: NIXL looks in its own folder, which has no TCPX "
              '(export NIXL_PLUGIN_DIR="$(uccl-tcpx-nixl-plugin-dir)")', file=sys.stderr)
    # Both processes on this host.
    os.environ.setdefault("UCCL_TCPX_IP", "127.0.0.1")

    began = time.monotonic()
    try:
        step("reference")
        start = time.monotonic()
        with run_roles(Role("reference", reference_role, opts)) as (R,):
            (ref,) = R.recv("reference")
            R.finish()
        print(f"model: Llama, {opts.config} ({ref['params'] / 1e6:.1f} M parameters, {ref['layers']} layers, {ref['dtype']}, "
              f"seed {opts.seed}) on {opts.device}; prompt {opts.prompt_tokens} tokens, {opts.new_tokens} new", flush=True)
        print(f"one process alone: time to first token {ms(ref['ttft'])}, {opts.new_tokens - 1} more tokens in "
              f"{ms(ref['decode_s'])}: {ref['tokens']} ({time.monotonic() - start:.1f} s)", flush=True)
        rows = []
        for backend in opts.backends.split(","):
            for path in (paths if backend == "TCPX" else [None]):
                start = time.monotonic()
                row = run_one(opts, backend, path, ref)
                if row:
                    rows.append(row)
                    print(f"({time.monotonic() - start:.1f} s)", flush=True)
    except Failure as e:
        print(f"FAIL at step [{e.step}]: {e.msg}", flush=True)
        sys.exit(1)

    print("== summary (time to first token: one process alone "
          f"{ms(ref['ttft'])})", flush=True)
    print(f"{'backend':<20} {'tokens':<7} {'KV':<7} {'TTFT w/o pull':>14} {'TTFT w/ pull':>13} {'pull':>10} "
          f"{'pull med':>10} {'make':>9} {'one desc':>10} {'ratio':>6}", flush=True)
    for r in rows:
        verdicts = " ".join(f"{'equal' if ok else 'DIFFER':<7}" for ok in (r["same"], r["kv_same"]))
        print(f"{r['where']:<20} {verdicts} {ms(r['prefill']):>14} {ms(r['ttft_pd']):>13} "
              f"{ms(r['pull']):>10} {ms(r['pull_med']):>10} {ms(r['make']):>9} {ms(r['one']):>10} "
              f"{r['pull_med'] / r['one']:>6.2f}", flush=True)
    bad = [r["where"] for r in rows if not (r["same"] and r["kv_same"])]
    if bad:
        print(f"FAIL: tokens or KV differ from one process generating alone: {', '.join(bad)}", flush=True)
        sys.exit(1)
    if not rows:
        print("FAIL: no backend ran", flush=True)
        sys.exit(1)
    # UCX may be missing from a NIXL build; TCPX, what this example is about, may not.
    if "TCPX" in opts.backends.split(",") and not any(r["where"].startswith("TCPX") for r in rows):
        print("FAIL: TCPX did not run (see uccl-tcpx-doctor)", flush=True)
        sys.exit(1)
    print(f"PASS: tokens and KV equal to one process generating alone over {', '.join(r['where'] for r in rows)} "
          f"({time.monotonic() - began:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
