#!/usr/bin/env python3
"""Where threads sleep: reads `perf script` output of sched:sched_switch events recorded with kernel
call chains, e.g.
  perf record -e sched:sched_switch -g -a -o sw.data -- sleep 1
  perf script -i sw.data | scripts/diag/sleep_reasons.py
and prints, per thread name (trailing digits dropped), how often its threads were switched out for
each reason (the first recognised kernel frame: sk_wait_data = waiting for socket data,
sk_stream_wait_memory = for send buffer room, do_sys_poll = in poll, futex_wait = a lock or park,
exit_to_user_mode = preempted) and the summed time until they ran again. Only threads with 50+
switches in the window count, so idle helpers of the other direction do not dilute the figures."""
import sys, re, collections
KNOWN = ['sk_wait_data', 'sk_stream_wait_memory', 'do_sys_poll', 'futex_wait', '__lock_sock', 'lock_sock_nested',
         'do_sched_yield', '__x64_sys_sched_yield', 'ep_poll', 'do_nanosleep', 'schedule_hrtimeout_range_clock',
         'wait_woken', 'irqentry_exit', 'exit_to_user_mode']
counts = collections.defaultdict(collections.Counter)
per_tid = collections.Counter()
events = []
slept = collections.defaultdict(collections.Counter)
pending = {}
names = {}
ev = None
frames = []
t_first = t_last = None
def flush():
    global ev
    if ev is None: return
    t, prev_pid, group, st, next_pid = ev
    where = next((k for k in KNOWN for f in frames if f.startswith(k)), frames[2] if len(frames) > 2 else '?')
    per_tid[prev_pid] += 1
    events.append((prev_pid, group, st, where))
    if st != 'R':
        pending[prev_pid] = (t, prev_pid, group, st, where)
    if next_pid in pending:
        t0, tid, g, s, w = pending.pop(next_pid)
        slept[(tid, g)][(s, w)] += t - t0
    ev = None
for line in sys.stdin:
    if not line.strip():
        flush(); frames = []; continue
    if not line.startswith((' ', '\t')):
        flush(); frames = []
        m = re.search(r'\s([\d.]+): sched:sched_switch: prev_comm=(.+?) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=.* next_pid=(\d+)', line)
        if m:
            t = float(m.group(1)); t_first = t_first or t; t_last = t
            ev = (t, m.group(3), re.sub(r'\d+$', '', m.group(2)), m.group(4), m.group(5))
        continue
    parts = line.split()
    if len(parts) >= 2 and ev is not None:
        frames.append(re.sub(r'\+0x.*', '', parts[1]))
flush()
active = {tid for tid, n in per_tid.items() if n >= 50}
sl = collections.defaultdict(collections.Counter)
ntids = collections.defaultdict(set)
for tid, g, st, w in events:
    if tid in active:
        counts[g][(st, w)] += 1
        ntids[g].add(tid)
for (tid, g), c in slept.items():
    if tid in active:
        for k, v in c.items(): sl[g][k] += v
slept = sl
span = (t_last or 0) - (t_first or 0)
print(f"window {span:.2f}s; sleep time is summed over the group's threads")
for g, c in sorted(counts.items()):
    tot = sum(c.values())
    if tot < 50 or g.startswith(('swapper', 'ksoftirqd', 'migration', 'kworker', 'perf')): continue
    print(f"{g} ({len(ntids[g])} threads with 50+ switches): {tot} switches")
    for (st, w), n in c.most_common(6):
        print(f"   {n:7d} {100*n/tot:5.1f}%  state {st:3} {w:32} slept {slept[g][(st, w)]:.3f}s")
