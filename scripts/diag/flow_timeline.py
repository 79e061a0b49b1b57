#!/usr/bin/env python3
"""Where a write's or read's time goes over the channels: joins the files an engine writes under
UCCL_TCPX_TRACE_FLOW=PREFIX (`PREFIX.<pid>.tsv`, one per process, both ends of a loopback run or
each host's files of a two-host run) and prints, per op and size, the end-to-end time (initiator's
post to its caller seeing it complete), every step's offset from the initiator's post and every
leg between consecutive steps (median, p10, p90, in microseconds), and which threads read the
replies and how long those then waited for the connection's lock.
  UCCL_TCPX_TRACE_FLOW=/tmp/flow <run both ends>
  scripts/diag/flow_timeline.py /tmp/flow
Steps are named `i.` (initiator) or `t.` (target) and listed in the order of their median offset;
a leg is the time from one step to the next one in that order, measured per transfer. Both ends'
clocks are CLOCK_MONOTONIC: legs across ends are exact on one host, meaningless across hosts
(there only the legs between steps of the same end count)."""
import collections
import glob
import sys


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def load(prefix):
    rows, header = [], None
    for path in sorted(glob.glob(glob.escape(prefix) + '.*.tsv')):
        with open(path) as f:
            header = f.readline().rstrip('\n').split('\t')
            for line in f:
                rows.append(dict(zip(header, line.rstrip('\n').split('\t'))))
    return rows, header


def main():
    if len(sys.argv) != 2:
        sys.exit('usage: flow_timeline.py PREFIX  (the value of UCCL_TCPX_TRACE_FLOW)')
    prefix = sys.argv[1]
    rows, header = load(prefix)
    if not rows:
        sys.exit(f'no records in {prefix}.*.tsv')
    steps = header[header.index('bytes') + 1:]
    ends = {}
    for r in rows:
        if r['seq'] == '-':
            continue
        # Each end numbers its own flows from 0: a write each way on one connection shares a
        # seq, and only which end initiated (connector or acceptor) tells them apart.
        key = (r['nonce'], r['op'], r['from'], r['seq'])
        ends.setdefault(key, {})[r['end']] = r
    groups = collections.defaultdict(list)
    unjoined = collections.Counter()
    for (nonce, op, _, seq), pair in ends.items():
        if 'initiator' not in pair or 'target' not in pair:
            unjoined[op] += 1
            continue
        i, t = pair['initiator'], pair['target']
        marks = {}
        for end, tag in ((i, 'i'), (t, 't')):
            for s in steps:
                at = int(end[s])
                if at:
                    marks[f'{tag}.{s}'] = at
        if 'i.post' not in marks or 'i.complete' not in marks:
            unjoined[op] += 1
            continue
        post = marks['i.post']
        offsets = {k: v - post for k, v in marks.items()}
        offsets['reader'] = i.get('reader', '-')
        groups[(op, int(i['bytes']))].append(offsets)
    if not groups:
        sys.exit(f'no initiator and target records of {prefix}.*.tsv join ({dict(unjoined)} unmatched)')
    for (op, size), transfers in sorted(groups.items()):
        e2e = [m['i.complete'] for m in transfers]
        print(f'{op} {size} B: {len(transfers)} joined ({unjoined[op]} unmatched); end-to-end p50 '
              f'{pct(e2e, 0.5) / 1e3:.1f} us (p10 {pct(e2e, 0.1) / 1e3:.1f}, p90 {pct(e2e, 0.9) / 1e3:.1f})')
        names = collections.Counter(k for m in transfers for k in m if k != 'reader')
        # A step seen in at least half the transfers is shown; the rest are noise of failures.
        shown = [n for n, c in names.items() if c * 2 >= len(transfers)]
        shown.sort(key=lambda n: pct([m[n] for m in transfers if n in m], 0.5))
        print(f'  {"step":<22}{"p50":>9}{"p10":>9}{"p90":>9}   us from the initiator\'s post')
        for n in shown:
            v = [m[n] for m in transfers if n in m]
            print(f'  {n:<22}{pct(v, 0.5) / 1e3:>9.1f}{pct(v, 0.1) / 1e3:>9.1f}{pct(v, 0.9) / 1e3:>9.1f}')
        print(f'  {"leg":<36}{"p50":>9}{"p10":>9}{"p90":>9}   us')
        for a, b in zip(shown, shown[1:]):
            v = [m[b] - m[a] for m in transfers if a in m and b in m]
            if v:
                leg = f'{a} > {b}'
                print(f'  {leg:<36}{pct(v, 0.5) / 1e3:>9.1f}{pct(v, 0.1) / 1e3:>9.1f}{pct(v, 0.9) / 1e3:>9.1f}')
        # Who read the replies, and how long each kind of reader's reply then waited for the
        # connection's lock before it was handled.
        names_of = {'c': 'the caller', 'r': 'a control reactor', 'p': 'the progress thread'}
        for reader, count in sorted(collections.Counter(m['reader'] for m in transfers).items()):
            waits = [m['i.reply_read'] - m['i.reply_arrived'] for m in transfers
                     if m['reader'] == reader and 'i.reply_read' in m and 'i.reply_arrived' in m]
            if waits:
                print(f'  replies read by {names_of.get(reader, reader)}: {count}, waiting for the lock p50 '
                      f'{pct(waits, 0.5) / 1e3:.1f} us (p90 {pct(waits, 0.9) / 1e3:.1f})')


if __name__ == '__main__':
    main()
