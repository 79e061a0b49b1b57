# NCCL (PyTorch's) moving GPU->GPU messages through the fake devmem NIC as its net plugin, the
# independent consumer the fake is held to. Run by scripts/nccl_over_fake.sh under torchrun with two
# ranks on one host: one GPU each, or both on GPU 0 of a one-GPU host. There each rank names a host
# of its own (NCCL_HOSTID), which NCCL requires of two ranks on one GPU and which leaves it no path
# between them but the net plugin; the two processes' kernels then take turns on the GPU, so the
# timings of such a run say nothing about NCCL's speed.
#
# For every size: rank 0 -> rank 1, rank 1 -> rank 0 and both at once (batched isend/irecv, so
# each rank's kernel sends while it waits to receive), every byte checked against a pattern both
# ranks compute; then rank 0 -> rank 1 timed. A phase that does not finish within
# NCCL_OVER_FAKE_PHASE_TIMEOUT seconds (default 120) prints every thread's stack and ends the
# process with status 3: a hang fails loudly instead of waiting for NCCL's own timeout.
#
# Output (rank 1): "nccl-over-fake TAG size=N GB/s=X lat_us=Y", and "nccl-over-fake: all N sizes
# bit-exact" at the end.
import datetime
import faulthandler
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

DEFAULT_SIZES = [4096, 3 * 4096 + 17, 65536, 524288, 524288 + 4095, 1 << 20, (4 << 20) - 1, 16 << 20,
                 (16 << 20) + 12345, 64 << 20]
PHASE_TIMEOUT = float(os.environ.get("NCCL_OVER_FAKE_PHASE_TIMEOUT", "120"))
TAG = os.environ.get("TAG", "")


def parse_size(text):
    text = text.strip()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


class Watchdog:
    """Ends the process if the current phase runs past its limit."""

    def __init__(self, rank):
        self.rank = rank
        self.lock = threading.Lock()
        self.phase = None
        threading.Thread(target=self.run, daemon=True).start()

    def enter(self, name):
        with self.lock:
            self.phase = (name, time.monotonic())

    def run(self):
        while True:
            time.sleep(1)
            with self.lock:
                phase = self.phase
            if phase and time.monotonic() - phase[1] > PHASE_TIMEOUT:
                print(f"nccl-over-fake {TAG}: HANG: rank {self.rank} spent more than {PHASE_TIMEOUT:.0f} s in "
                      f"{phase[0]}; stacks follow", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(3)


def pattern(size, seed, device):
    """Bytes both ranks can compute: a multiplicative hash of the index and the seed, so that a
    shifted, repeated or stale page differs."""
    i = torch.arange(size, dtype=torch.int64, device=device)
    return ((i * 2654435761 + seed * 40503 + (i >> 12) * 97) & 0xFF).to(torch.uint8)


def check(got, want, what):
    if torch.equal(got, want):
        return
    bad = (got != want).nonzero()
    first = int(bad[0])
    raise AssertionError(f"{what}: {bad.numel()} of {want.numel()} bytes differ, first at {first} "
                         f"(got {int(got[first])}, want {int(want[first])})")


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == 2, "two ranks: one sender, one receiver"
    peer = 1 - rank
    gpus = torch.cuda.device_count()
    assert gpus >= 1, "torch sees no GPU (CUDA_VISIBLE_DEVICES?)"
    if gpus < world:
        os.environ["NCCL_HOSTID"] = f"nccl-over-fake-rank-{rank}"
        print(f"nccl-over-fake {TAG}: rank {rank} on GPU {rank % gpus} of {gpus}, as host "
              f"{os.environ['NCCL_HOSTID']}", flush=True)
    gpu = rank % gpus
    torch.cuda.set_device(gpu)
    device = torch.device("cuda", gpu)
    dog = Watchdog(rank)
    dog.enter("init_process_group")
    dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(seconds=PHASE_TIMEOUT * 2))
    sizes = [parse_size(s) for s in os.environ["NCCL_OVER_FAKE_SIZES"].split(",")] \
        if os.environ.get("NCCL_OVER_FAKE_SIZES") else DEFAULT_SIZES

    dog.enter("first barrier")
    dist.barrier(device_ids=[gpu])
    for n, size in enumerate(sizes):
        # Correctness: each direction, then both at once.
        for it, (src, dst) in enumerate([(0, 1), (1, 0), (None, None)]):
            dog.enter(f"size {size}: " + (f"{src} -> {dst}" if src is not None else "exchange"))
            seed = n * 16 + it
            want = pattern(size, seed * 2 + peer, device)
            got = torch.full((size,), 0xEE, dtype=torch.uint8, device=device)
            if src is None:
                mine = pattern(size, seed * 2 + rank, device)
                ops = [dist.P2POp(dist.isend, mine, peer), dist.P2POp(dist.irecv, got, peer)]
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
                torch.cuda.synchronize()
                check(got, want, f"size {size}, exchange, rank {rank} received")
            elif rank == src:
                dist.send(pattern(size, seed * 2 + rank, device), dst)
                torch.cuda.synchronize()
            else:
                dist.recv(got, src)
                torch.cuda.synchronize()
                check(got, want, f"size {size}, {src} -> {dst}")

        # Throughput, rank 0 -> rank 1.
        iters = max(5, min(200, (256 << 20) // size))
        buf = torch.full((size,), rank + 1, dtype=torch.uint8, device=device)

        def one():
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)

        dog.enter(f"size {size}: warm-up")
        for _ in range(3):
            one()
        torch.cuda.synchronize()
        dist.barrier(device_ids=[gpu])
        dog.enter(f"size {size}: {iters} timed sends")
        t = time.perf_counter()
        for _ in range(iters):
            one()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if rank == 1:
            assert int(buf[0]) == 1 and int(buf[-1]) == 1
            print(f"nccl-over-fake {TAG} size={size} GB/s={size * iters / dt / 1e9:.3f} "
                  f"lat_us={dt / iters * 1e6:.1f}", flush=True)
        dog.enter(f"size {size}: barrier")
        dist.barrier(device_ids=[gpu])

    dog.enter("destroy_process_group")
    dist.destroy_process_group()
    if rank == 1:
        print(f"nccl-over-fake {TAG}: all {len(sizes)} sizes bit-exact in both directions and exchanged",
              flush=True)


if __name__ == "__main__":
    main()
