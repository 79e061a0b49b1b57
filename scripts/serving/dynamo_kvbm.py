#!/usr/bin/env python3
"""NVIDIA Dynamo's KV block manager (KVBM) choosing NIXL backends from the environment, then our
backend TCPX moving blocks between two processes on host memory (DRAM) or, with --vram, between
device blocks on GPUs (VRAM).

Follows ai-dynamo/dynamo lib/memory/src/nixl/config.rs @ b57ee259d30a
(NixlBackendConfig::from_env, with dynamo_config's parse_bool: true/false, 1/0, on/off, yes/no,
any case, nothing trimmed, anything else an error "Invalid boolean value: '...'. Expected one of:
true/false, 1/0, on/off, yes/no") and lib/memory/src/nixl/agent.rs @ 72dcd5d8719b
(NixlAgent::from_nixl_backend_config / add_backend_with_params: get_plugin_params(NAME), the
custom parameters laid over them, create_backend(NAME, params); a missing plugin is an error);
NIXL's Python agent: ai-dynamo/nixl src/api/python/_api.py @ 8770b655a6b1.

from_env, reproduced in Python (kvbm_backends_from_env, with its own checks below): every
variable DYN_KVBM_NIXL_BACKEND_<NAME>=<bool> enables (or, false, leaves out) backend NAME
upper-cased; a further "_" in NAME is refused ("Custom NIXL backend parameters are not yet
supported. ..."), so TCPX takes no parameters this way and gets the plugin's defaults
(connect_on_load=1, the rest empty: the engine's environment). Dynamo does this in Rust through
nixl_sys; here the same calls go through NIXL's Python agent: nixl_agent(name,
nixl_agent_config(backends=[])), get_plugin_params("TCPX"), create_backend("TCPX", params).
Then a short WRITE of blocks between the two agents (initialize_xfer, no notification, polled
until DONE), every byte checked at the target; under --vram both sides' blocks are device blocks,
registered and described as VRAM with the GPU's index.

usage: dynamo_kvbm.py [--path network|same-host] [--vram I,T] [SCENARIO ...]
"""

import os

import numpy as np

from common import (
    Failure, Role, alloc, check, harness_main, nixl_agent, nixl_agent_config, pattern, role_gpu, run_roles, step,
    wait_done,
)

PREFIX = "DYN_KVBM_NIXL_BACKEND_"


class KvbmConfigError(Exception):
    pass


def _is_truthy(val):
    return val.lower() in ("1", "true", "on", "yes")


def _is_falsey(val):
    return val.lower() in ("0", "false", "off", "no")


def parse_bool(val):
    if _is_truthy(val):
        return True
    if _is_falsey(val):
        return False
    raise KvbmConfigError(f"Invalid boolean value: '{val}'. Expected one of: true/false, 1/0, on/off, yes/no")


def kvbm_backends_from_env(environ):
    """NixlBackendConfig::from_env: {BACKEND: {params}} of the enabled backends."""
    backends = {}
    for key, value in environ.items():
        if not key.startswith(PREFIX):
            continue
        remainder = key[len(PREFIX):]
        if "_" in remainder:
            raise KvbmConfigError(
                "Custom NIXL backend parameters are not yet supported. "
                f"Found: {key}. Please use only DYN_KVBM_NIXL_BACKEND_<backend>=true "
                "to enable backends with default parameters."
            )
        backend_name = remainder.upper()
        try:
            enabled = parse_bool(value)
        except KvbmConfigError as e:
            raise KvbmConfigError(f"Invalid value for {key}: {e}") from None
        if enabled:
            backends[backend_name] = {}
    return backends


def _parse_checks():
    ok = {
        (("TCPX", "true"),): {"TCPX": {}},
        (("tcpx", "ON"),): {"TCPX": {}},
        (("Tcpx", "Yes"),): {"TCPX": {}},
        (("TCPX", "1"),): {"TCPX": {}},
        (("TCPX", "false"),): {},
        (("TCPX", "0"),): {},
        (("TCPX", "Off"),): {},
        (("TCPX", "NO"),): {},
        (("UCX", "true"), ("TCPX", "true")): {"UCX": {}, "TCPX": {}},
        (("", "true"),): {"": {}},  # nothing after the prefix: a backend named ""
    }
    for pairs, want in ok.items():
        env = {PREFIX + k: v for k, v in pairs}
        env.update({"DYN_KVBM_NIXL_BACKEND": "true", "XDYN_KVBM_NIXL_BACKEND_UCX": "true", "PATH": "/bin"})
        got = kvbm_backends_from_env(env)
        check(got == want, f"{env}: {got}, expected {want}")
    bad = {
        "TCPX_NUM_CHANNELS": ("2", "Custom NIXL backend parameters are not yet supported. Found: "
                              "DYN_KVBM_NIXL_BACKEND_TCPX_NUM_CHANNELS. Please use only "
                              "DYN_KVBM_NIXL_BACKEND_<backend>=true to enable backends with default parameters."),
        "TCPX_": ("true", None),
        "TCPX": ("maybe", "Invalid value for DYN_KVBM_NIXL_BACKEND_TCPX: Invalid boolean value: 'maybe'. "
                          "Expected one of: true/false, 1/0, on/off, yes/no"),
    }
    for name, (value, message) in bad.items():
        try:
            kvbm_backends_from_env({PREFIX + name: value})
        except KvbmConfigError as e:
            check(message is None or str(e) == message, f"{name}={value}: {e}")
            continue
        raise Failure(RULES, f"{PREFIX}{name}={value!r} was taken")
    for value in (" true", "true ", "", "y", "enabled"):  # parse_bool trims nothing
        try:
            kvbm_backends_from_env({PREFIX + "TCPX": value})
        except KvbmConfigError:
            continue
        raise Failure(RULES, f"{PREFIX}TCPX={value!r} was taken")


RULES = "the DYN_KVBM_NIXL_BACKEND_ rules"


BLOCK = 16 * 1024
BLOCKS = 32


def make_agent(name):
    """NixlAgent::from_nixl_backend_config(name, NixlBackendConfig::from_env())."""
    step(f"{name}: NixlBackendConfig::from_env")
    config = kvbm_backends_from_env(os.environ)
    check("TCPX" in config, f"TCPX is not enabled: {config}")
    step(f"{name}: NixlAgent::new")
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    for backend, custom_params in config.items():
        where = f"{name}: add_backend_with_params({backend})"
        step(where)
        try:
            params = dict(agent.get_plugin_params(backend))
        except Exception as e:
            raise Failure(where, f"no {backend} plugin found: {e}") from None
        params.update(custom_params)
        agent.create_backend(backend, params)
    return agent, config


def target(link):
    gpu = role_gpu(second=True)
    agent, config = make_agent("kvbm-target")
    buf = alloc(BLOCKS * BLOCK, gpu)
    descs = agent.get_reg_descs([(buf.addr, buf.size, buf.dev, "")], buf.kind)
    agent.register_memory(descs)
    link.send("meta", agent.get_agent_metadata(), buf.addr, sorted(config), agent.get_plugin_params("TCPX"), buf.dev)
    blocks, seed = link.recv("check")
    step("kvbm-target: every byte")
    view = buf.read(0, buf.size).reshape(BLOCKS, BLOCK)
    expected = np.zeros_like(view)
    for src, dst in blocks:
        expected[dst] = pattern(BLOCK, seed + src)
    bad = np.flatnonzero((view != expected).any(axis=1))
    check(bad.size == 0, f"blocks {bad.tolist()} differ from what the WRITE should have written")
    agent.deregister_memory(descs)
    link.send("checked")


def initiator(link):
    gpu = role_gpu()
    agent, _ = make_agent("kvbm-initiator")
    (meta, raddr, _, _, rdev) = link.recv("meta")
    buf = alloc(BLOCKS * BLOCK, gpu)
    seed = 9100
    buf.write(0, np.concatenate([pattern(BLOCK, seed + b) for b in range(BLOCKS)]))
    descs = agent.get_reg_descs([(buf.addr, buf.size, buf.dev, "")], buf.kind)
    agent.register_memory(descs)
    step("kvbm-initiator: add_remote_agent")
    peer = agent.add_remote_agent(meta)
    rng = np.random.default_rng(3)
    src = rng.choice(BLOCKS, 12, replace=False)
    dst = rng.choice(BLOCKS, 12, replace=False)
    local = agent.get_xfer_descs([(buf.addr + int(s) * BLOCK, BLOCK, buf.dev) for s in src], buf.kind)
    remote = agent.get_xfer_descs([(raddr + int(d) * BLOCK, BLOCK, rdev) for d in dst], buf.kind)
    step("kvbm-initiator: WRITE of 12 blocks")
    handle = agent.initialize_xfer("WRITE", local, remote, peer)
    state = agent.transfer(handle)
    check(state in ("DONE", "PROC"), f"transfer answered {state}")
    wait_done(agent, handle, "WRITE of 12 blocks", sleep_s=0.0005)
    agent.release_xfer_handle(handle)
    agent.deregister_memory(descs)
    link.send("written", [(int(s), int(d)) for s, d in zip(src, dst)], seed)


def parse_rules():
    step(RULES)
    _parse_checks()
    return "true/1/on/yes and false/0/off/no in any case; parameters, other words and spaces refused"


def write():
    with run_roles(Role("kvbm-target", target), Role("kvbm-initiator", initiator)) as (T, I):
        step("metadata exchange")
        meta = T.recv("meta")
        I.send("meta", *meta)
        step("the WRITE")
        blocks, seed = I.recv("written")
        T.send("check", blocks, seed)
        T.recv("checked")
        step("teardown")
        I.finish()
        T.finish()
    return f"backends {meta[2]}, TCPX created with its plugin parameters {meta[3]}"


SCENARIOS = [("env-rules", parse_rules), ("write", write)]

if __name__ == "__main__":
    harness_main("dynamo_kvbm", SCENARIOS, env={"DYN_KVBM_NIXL_BACKEND_TCPX": "true"})
