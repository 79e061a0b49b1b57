#!/usr/bin/env python3
"""Per-step summaries of a trace (UCCL_TCPX_TRACE=PREFIX, `PREFIX.<pid>.tsv`; docs/TRACE.md), per
process, in microseconds as `p50 (min-max)`:
  device   the same-host GPU path, per direction and size: post > copies issued > last batch seen
           finished (and by whom: the caller's poll, its wait, the progress thread, a failure) >
           outcome handed to the caller, and the asks to the owner
  host     the same-host host-memory path, per role (a write copied here, a read copied here, a
           write posted here and copied by the peer) and size: post, queued, picked up, offered to
           the helpers, helpers joining, last piece, finished, outcome; what the pieces and threads
           did
  staging  staged chunks, in bursts (first chunk accepted while none was in flight to none in
           flight again), consecutive bursts of one shape grouped: the bursts' durations and, per
           comm of the burst nearest the median, each stage's mean time from the one before
  failover per socket comm over several links: sockets declared dead and why, pieces sent again
           (for a dead socket, or to ask for an acknowledgement overdue), re-dials of dead links
           started, joined and failed
  joins    per send comm that added sockets: dialed, taken or refused by the receiving side,
           opened, and the time from dial to filing and from filing to the acknowledgement read
  UCCL_TCPX_TRACE=device,host,staging,socket:/tmp/t <run>
  scripts/diag/trace_summary.py /tmp/t"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_events import codes, events  # noqa: E402


def spread(values):
    v = sorted(values)
    if not v:
        return None
    return f'{v[len(v) // 2] / 1e3:.1f} ({v[0] / 1e3:.1f}-{v[-1] / 1e3:.1f})'


def counts(values):
    v = sorted(values)
    return f'{v[len(v) // 2]} ({v[0]}-{v[-1]})' if v else '-'


def done_times(evs):
    """When each (pid, conn, side, transfer)'s outcome was first handed to its caller."""
    out = {}
    for e in evs:
        if e['event'] == 'call_done':
            out.setdefault((e['pid'], e['conn'], e['side'], e['transfer']), e['ns'])
    return out


def device(evs, by_name):
    issued, seen, done = {}, collections.defaultdict(list), done_times(evs)
    for e in evs:
        key = (e['pid'], e.get('conn'), e.get('side'), e.get('transfer'))
        if e['event'] == 'device_issued' and e['batches'] > 0:
            issued[key] = e
        elif e['event'] == 'device_seen':
            seen[key].append(e)
    groups = collections.defaultdict(list)
    for key, e in issued.items():
        batches = seen.get(key, [])
        if len(batches) < e['batches'] or key not in done:
            continue
        last = batches[e['batches'] - 1]
        groups[(key[0], e['write'], e['bytes'])].append((e, last, done[key]))
    for (pid, write, size), ts in sorted(groups.items()):
        verb = 'write' if write else 'read'
        seers = collections.Counter(by_name.get(last['by'], last['by']) for _, last, _ in ts)
        asks = sum(e['asks'] for e, _, _ in ts)
        ask_ns = sum(e['ask_ns'] for e, _, _ in ts)
        line = (f'device[{pid}] {verb} {size} B: {len(ts)} transfers; seen by ' +
                ' '.join(f'{n} {seers[n]}' for n in ('poll', 'wait', 'progress', 'failure')) +
                f'; {asks} asks ({ask_ns / 1e3:.1f} us); us p50 (min-max):')
        steps = {
            'post>issued': [e['ns'] - e['entered'] for e, _, _ in ts],
            'issued>seen': [last['ns'] - e['ns'] for e, last, _ in ts],
            'seen>reported': [d - last['ns'] for _, last, d in ts],
            'total': [d - e['entered'] for e, _, d in ts],
        }
        print(line + ''.join(f' {n} {spread(v)}' for n, v in steps.items()))


HOST_MARKS = ['posted', 'queued', 'picked', 'offered', 'first_join', 'last_join', 'last_piece', 'finished',
              'reported']
HOST_STEPS = [('post>queued', 'posted', 'queued'), ('queued>picked', 'queued', 'picked'),
              ('picked>offered', 'picked', 'offered'), ('offered>first-join', 'offered', 'first_join'),
              ('offered>last-join', 'offered', 'last_join'), ('picked>last-piece', 'picked', 'last_piece'),
              ('last-piece>finished', 'last_piece', 'finished'), ('finished>reported', 'finished', 'reported')]


def host(evs):
    posted, jobs, done = {}, collections.defaultdict(lambda: {'joins': [], 'pieces': []}), done_times(evs)
    records = []
    for e in evs:
        name = e['event']
        if name == 'host_posted':
            posted[(e['pid'], e['conn'], e['side'], e['transfer'])] = e
        elif name == 'host_offered':
            jobs[(e['pid'], e['job'])]['offered'] = e['ns']
        elif name == 'host_joined':
            jobs[(e['pid'], e['job'])]['joins'].append(e['ns'])
        elif name == 'host_piece':
            jobs[(e['pid'], e['job'])]['pieces'].append((e['start'], e['ns'], e['bytes'], e['tid']))
        elif name == 'host_copied':
            j = jobs.pop((e['pid'], e['job']), {'joins': [], 'pieces': []})
            key = (e['pid'], e['conn'], e['side'], e['transfer'])
            post = posted.pop(key, None) if e['transfer'] else None
            r = {'pid': e['pid'], 'role': 'read copied here' if e['transfer'] else 'write copied here',
                 'bytes': e['bytes'], 'posted': post['entered'] if post else 0, 'queued': e['queued'],
                 'picked': e['picked'], 'offered': j.get('offered', 0),
                 'first_join': min(j['joins'], default=0), 'last_join': max(j['joins'], default=0),
                 'last_piece': max((p[1] for p in j['pieces']), default=0), 'finished': e['ns'],
                 'reported': done.get(key, 0) if e['transfer'] else 0, 'by_caller': e['by_caller'],
                 'joined': len(j['joins']), 'threads': len({p[3] for p in j['pieces']}),
                 'pieces': [(p[1] - p[0], p[2]) for p in j['pieces']]}
            records.append(r)
    # Writes posted here and copied in by the peer: only their post and outcome are seen here.
    for key, post in posted.items():
        if post['write'] and key in done:
            records.append({'pid': key[0], 'role': 'write posted here', 'bytes': post['bytes'],
                            'posted': post['entered'], 'reported': done[key], 'pieces': []})
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r['pid'], r['role'], r['bytes'])].append(r)
    for (pid, role, size), rs in sorted(groups.items()):
        line = f'host[{pid}] {role} {size} B: {len(rs)} jobs; us p50 (min-max):'
        for name, a, b in HOST_STEPS:
            s = spread([r[b] - r[a] for r in rs if r.get(a) and r.get(b)])
            if s:
                line += f' {name} {s}'
        first = [next(r[m] for m in HOST_MARKS if r.get(m)) for r in rs]
        last = [max(r.get(m, 0) for m in HOST_MARKS) for r in rs]
        print(line + f' total {spread([b - a for a, b in zip(first, last)])}')
        if role == 'write posted here':
            continue
        callers = sum(1 for r in rs if r['by_caller'])
        pieces = [p for r in rs for p in r['pieces']]
        line = (f'host[{pid}]   run by caller {callers} worker {len(rs) - callers}; pieces per job '
                f'{counts([len(r["pieces"]) for r in rs])}, helpers joined {counts([r["joined"] for r in rs])}, '
                f'threads took pieces {counts([r["threads"] for r in rs])}')
        if pieces:
            sizes = sorted(p[1] >> 10 for p in pieces)
            line += f', piece KiB {sizes[len(sizes) // 2]} ({sizes[0]}-{sizes[-1]}), piece us {spread([p[0] for p in pieces])}'
            ns = sum(p[0] for p in pieces)
            if ns:
                line += f', {sum(p[1] for p in pieces) / ns:.2f} GB/s per thread copying'
        print(line)


STAGE_ORDER = ['posted', 'copy_issued', 'handed', 'copy_seen', 'inner_done', 'reported']


def staging(evs, step_name):
    chunks, bursts, calls = {}, [], collections.defaultdict(list)
    open_burst, in_flight = {}, collections.Counter()
    for e in evs:
        name, pid = e['event'], e['pid']
        if name == 'stage_chunk':
            if in_flight[pid] == 0:
                open_burst[pid] = {'pid': pid, 't0': e['ns'], 'end': e['ns'], 'chunks': [], 'calls': []}
            in_flight[pid] += 1
            c = {'comm': e['comm'], 'send': e['send'], 'bytes': e['bytes'], 'staged': e['staged'],
                 'marks': {'posted': e['ns']}, 'issue_ns': 0, 'parts': 0}
            chunks[(pid, e['chunk'])] = c
            open_burst[pid]['chunks'].append(c)
        elif name == 'stage_issue' and (pid, e['chunk']) in chunks:
            c = chunks[(pid, e['chunk'])]
            c['issue_ns'] += e['issue_ns']
            c['parts'] += e['parts']
        elif name == 'stage_step' and (pid, e['chunk']) in chunks:
            step = step_name.get(e['step'], str(e['step']))
            chunks[(pid, e['chunk'])]['marks'].setdefault(step, e['ns'])
            if step == 'reported' and pid in open_burst:
                in_flight[pid] -= 1
                b = open_burst[pid]
                b['end'] = max(b['end'], e['ns'])
                if in_flight[pid] == 0:
                    bursts.append(open_burst.pop(pid))
        elif name == 'stage_calls' and pid in open_burst:
            open_burst[pid]['calls'].append(e)
    groups = []
    for b in bursts:
        shape = (b['pid'], sum(c['bytes'] for c in b['chunks']), sum(c['send'] for c in b['chunks']),
                 sum(1 - c['send'] for c in b['chunks']), sum(c['staged'] for c in b['chunks']))
        if groups and groups[-1][0] == shape:
            groups[-1][1].append(b)
        else:
            groups.append((shape, [b]))
    for i, ((pid, size, sends, recvs, staged), bs) in enumerate(groups):
        durations = [b['end'] - b['t0'] for b in bs]
        print(f'staging[{pid}] group {i}: {len(bs)} bursts of {size} B ({sends} send + {recvs} recv chunks, '
              f'{staged} staged); us p50 (min-max) {spread(durations)}')
        median = sorted(durations)[len(durations) // 2]
        typical = min(bs, key=lambda b: abs(b['end'] - b['t0'] - median))
        per_comm = collections.defaultdict(list)
        for c in typical['chunks']:
            per_comm[(c['comm'], c['send'])].append(c)
        print(f'staging[{pid}]   typical: t0 {typical["t0"] / 1e3:.1f} us, {(typical["end"] - typical["t0"]) / 1e3:.1f} us long')
        for (comm, send), cs in sorted(per_comm.items()):
            # Stages in the order they happened (a receive's copy comes after its inner receive,
            # a send's before, a part's before the whole), by their median offset.
            def offset(m):
                v = sorted(c['marks'][m] - c['marks']['posted'] for c in cs if m in c['marks'])
                return (v[len(v) // 2], STAGE_ORDER.index(m) if m in STAGE_ORDER else len(STAGE_ORDER))
            order = sorted({m for c in cs for m in c['marks']}, key=offset)
            line = f'staging[{pid}]   comm {comm} {"send" if send else "recv"} {len(cs)} x {cs[0]["bytes"] >> 10} KiB:'
            for a, b in zip(order, order[1:]):
                steps = [c['marks'][b] - c['marks'][a] for c in cs if a in c['marks'] and b in c['marks']]
                if steps:
                    line += f' {a}>{b} {sum(steps) / len(steps) / 1e3:.1f}'
            issue = [c['issue_ns'] for c in cs if c['staged']]
            if issue:
                line += f' | issue mean {sum(issue) / len(issue) / 1e3:.1f} max {max(issue) / 1e3:.1f} us'
            parts = [c['parts'] for c in cs if c['parts'] > 1]
            if parts:
                line += f' | {len(parts)} chunks copied in parts, {sum(parts) / len(parts):.1f} parts each'
            mine = [e for e in typical['calls'] if e['comm'] == comm]
            if mine:
                line += (f' | {sum(e["tests"] for e in mine)} tests, gap max {max(e["max_gap_ns"] for e in mine) / 1e3:.1f} us, '
                         f'busy {sum(e["busy_ns"] for e in mine) / 1e3:.1f} us')
            print(line)


def failover(evs, named):
    comms = collections.defaultdict(list)
    for e in evs:
        if e['event'] in ('sock_declined', 'sock_dead', 'sock_resent', 'sock_redial', 'sock_rejoined',
                          'sock_redial_failed'):
            comms[(e['pid'], e['comm'])].append(e)
    for (pid, comm), es in sorted(comms.items()):
        dead = [f'{e["socket"]} ({named["why"].get(e["why"], e["why"])})' for e in es if e['event'] == 'sock_dead']
        resent = collections.Counter()
        for e in es:
            if e['event'] == 'sock_resent':
                cause = named['cause'].get(e['cause'], e['cause'])
                resent[(cause, 'pieces')] += e['pieces']
                resent[(cause, 'bytes')] += e['bytes']
        causes = sorted({c for c, _ in resent})
        again = ', '.join(f'{resent[(c, "pieces")]} pieces ({resent[(c, "bytes")]} B) {c}' for c in causes)
        steps = collections.Counter(e['event'] for e in es)
        declined = collections.Counter(e['socket'] for e in es if e['event'] == 'sock_declined')
        left = ', '.join(f'{k}: {n}' for k, n in sorted(declined.items()))
        print(f'links[{pid}] comm {comm:x}: pieces left to faster sockets {sum(declined.values())}'
              f'{f" (by socket {left})" if left else ""}; dead sockets {", ".join(dead) or "none"}; '
              f'sent again: {again or "none"}; re-dials {steps["sock_redial"]} started, '
              f'{steps["sock_rejoined"]} joined, {steps["sock_redial_failed"]} failed')


def joins(evs):
    """Per send comm that added sockets: each added socket's dial (sender), filing by the receiving
    side (taken or refused) and acknowledgement read (sender), joined on the comm id both ends
    trace."""
    steps = collections.defaultdict(dict)  # (comm, socket) -> {event: ns}
    refused = collections.Counter()
    for e in evs:
        if e['event'] == 'sock_filed' and not e['taken']:
            refused[e['comm']] += 1
        elif e['event'] in ('sock_dial', 'sock_filed', 'sock_opened'):
            steps[(e['comm'], e['socket'])].setdefault(e['event'], e['ns'])
    for comm in sorted({c for c, _ in steps} | set(refused)):
        mine = [v for (c, _), v in steps.items() if c == comm and 'sock_dial' in v]
        if not mine and not refused[comm]:
            continue
        leg = lambda a, b: spread([v[b] - v[a] for v in mine if a in v and b in v])  # noqa: E731
        print(f'joins comm {comm:x}: {len(mine)} sockets dialed, '
              f'{sum("sock_filed" in v for v in mine)} taken by the receiver, {refused[comm]} refused, '
              f'{sum("sock_opened" in v for v in mine)} opened; dial > filed {leg("sock_dial", "sock_filed")}, '
              f'filed > opened {leg("sock_filed", "sock_opened")} us')


def main():
    if len(sys.argv) != 2:
        sys.exit('usage: trace_summary.py PREFIX  (the path prefix of UCCL_TCPX_TRACE)')
    prefix = sys.argv[1]
    evs = events(prefix)
    named = codes(prefix)
    device(evs, named.get('by', {}))
    host(evs)
    staging(evs, named.get('step', {}))
    failover(evs, {'why': named.get('why', {}), 'cause': named.get('cause', {})})
    joins(evs)


if __name__ == '__main__':
    main()
