#!/usr/bin/env python3
"""CPU time (user, system), time spent runnable but waiting for a CPU (schedstat) and context
switches per second of every thread of every process whose name starts with NAME, summed per thread
name with trailing digits dropped (uccl-sock-tx0..15 -> uccl-sock-tx), plus the host's busy share
from /proc/stat: after DELAY seconds, over WINDOW
seconds, REPEAT times (default once). Reads /proc only; run it next to a long benchmark, e.g.
  uccl-tcpx-bench --ops write --sizes 64M --iters 2500 --no-baseline & scripts/diag/thread_cpu.py uccl-tcpx-bench 2 1 3
usage: thread_cpu.py NAME DELAY WINDOW [REPEAT]"""
import os, sys, time, re, collections
name, delay, window = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 1
HZ = os.sysconf('SC_CLK_TCK')
def procs():
    out = []
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                if open(f'/proc/{p}/comm').read().strip().startswith(name[:15]): out.append(p)
            except OSError: pass
    return out
def snap():
    d = {}
    for p in procs():
        try: tasks = os.listdir(f'/proc/{p}/task')
        except OSError: continue
        for t in tasks:
            try:
                st = open(f'/proc/{p}/task/{t}/stat').read()
                comm = st[st.index('(')+1:st.rindex(')')]
                f = st[st.rindex(')')+2:].split()
                ut, stt = int(f[11]), int(f[12])
                s = open(f'/proc/{p}/task/{t}/status').read()
                v = int(re.search(r'voluntary_ctxt_switches:\s+(\d+)', s).group(1))
                nv = int(re.search(r'nonvoluntary_ctxt_switches:\s+(\d+)', s).group(1))
                try:
                    waited = int(open(f'/proc/{p}/task/{t}/schedstat').read().split()[1])
                except (OSError, IndexError, ValueError):
                    waited = 0
                d[(p, t)] = (comm, ut, stt, v, nv, waited)
            except (OSError, ValueError, AttributeError): pass
    return d
def cpu():
    f = open('/proc/stat').readline().split()[1:]
    v = list(map(int, f)); return v
time.sleep(delay)
for _ in range(repeat):
    a, ca, t0 = snap(), cpu(), time.time()
    time.sleep(window)
    b, cb, t1 = snap(), cpu(), time.time()
    dt = t1 - t0
    groups = collections.defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    for k, (comm, ut, st, v, nv, w) in b.items():
        if k not in a: continue
        _, ut0, st0, v0, nv0, w0 = a[k]
        g = groups[(k[0], re.sub(r'\d+$', '', comm))]
        g[0] += 1; g[1] += (ut - ut0) / HZ / dt; g[2] += (st - st0) / HZ / dt; g[3] += (v - v0) / dt; g[4] += (nv - nv0) / dt
        g[5] += (w - w0) / 1e9 / dt
    d = [y - x for x, y in zip(ca, cb)]
    tot = sum(d); idle = d[3] + d[4]
    print(f"host: busy {100*(1-idle/tot):.0f}% (user {100*d[0]/tot:.0f}% sys {100*d[2]/tot:.0f}% softirq {100*d[6]/tot:.0f}%) over {dt:.2f}s")
    for (p, n), (cnt, u, s, v, nv, w) in sorted(groups.items()):
        if u + s < 0.01: continue
        print(f"  pid {p} {n:<20} x{cnt:<3} user {u:5.2f} sys {s:5.2f} cores, waiting for one {w:5.2f}, switches/s vol {v:8.0f} invol {nv:6.0f}")
