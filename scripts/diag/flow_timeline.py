#!/usr/bin/env python3
"""Where a write's or read's time goes, over the channels or inline on the control stream: reads the
`flow` events of the files a trace writes (UCCL_TCPX_TRACE=PREFIX or flow:PREFIX,
`PREFIX.<pid>.tsv`, one per process: both ends of a loopback run, or each host's files of a two-host
run), rebuilds each end's timeline of every write and read, joins the two ends of each, and prints
per op and size the end-to-end time (initiator's post to its caller seeing it complete), every
step's offset from the initiator's post and every leg between consecutive steps (median, p10, p90,
in microseconds), and which threads read the replies and how long those then waited for the
connection's lock.
  UCCL_TCPX_TRACE=flow:/tmp/flow <run both ends>
  scripts/diag/flow_timeline.py /tmp/flow [--first N]
With --first N, each group's N earliest transfers follow its summary one by one (every step's
offset and each leg): where a connection's first transfers spend what steady ones do not.
Steps are named `i.` (initiator) or `t.` (target) and listed in the order of their median offset;
a leg is the time from one step to the next one in that order, measured per transfer. Both ends'
clocks are CLOCK_MONOTONIC: legs across ends are exact on one host, meaningless across hosts
(there only the legs between steps of the same end count)."""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_events import events, pct  # noqa: E402

STEPS = ['post', 'returned', 'request_sent', 'request_read', 'queued', 'first_posted', 'last_chunk',
         'reply_sent', 'reply_arrived', 'reply_read', 'complete']
KIND = {1: 'write_request', 2: 'read_request', 3: 'done', 4: 'data', 5: 'inline_write', 6: 'read_small',
        7: 'read_data', 8: 'inline_send'}
REQUESTS = {'write_request': True, 'read_request': False, 'inline_write': True, 'read_small': False}
REPLIES = ('done', 'data', 'read_data')
INLINE = ('inline_write', 'read_small')


def reader(thread):
    if thread.startswith('uccl-progress'):
        return 'p'
    if thread.startswith('uccl-ctrl'):
        return 'r'
    return 'c'


def records(evs):
    """Each connection end's record of every write and read it initiated or served."""
    calls = collections.defaultdict(dict)
    recs, flows, unposted, out = {}, {}, collections.defaultdict(list), []

    def new(end, key, initiator, write, transfer=None):
        r = {'conn': key[0], 'side': key[1], 'initiator': initiator, 'write': write, 'transfer': transfer,
             'seq': None, 'xfer': key[3], 'inline': False, 'bytes': 0, 'reader': '-', 'marks': {}}
        recs[key] = r
        out.append(r)
        return r

    def mark(r, step, at):
        if r is not None and at:
            r['marks'].setdefault(step, at)

    for e in evs:
        name, end = e['event'], (e.get('conn'), e.get('side'))
        if name == 'flow_call':
            calls[end + (e['transfer'],)].setdefault('post', e['entered'])
        elif name == 'flow_returned':
            calls[end + (e['transfer'],)].setdefault('returned', e['ns'])
        elif name == 'call_done':
            calls[end + (e['transfer'],)].setdefault('complete', e['ns'])
        elif name == 'flow_request':
            new(end, end + ('o', e['xfer']), True, bool(e['write']), e['transfer'])
        elif name == 'flow_plan':
            r = recs.get(end + ('o' if e['ours'] else 'p', e['xfer']))
            if r is not None:
                r.update(seq=e['seq'], bytes=e['bytes'], recv=e['recv'])
                flows[end + (e['flow'],)] = r
        elif name == 'flow_msg_in':
            kind = KIND.get(e['kind'])
            if kind in REQUESTS:
                r = new(end, end + ('p', e['id']), False, REQUESTS[kind])
                r['inline'] = kind in INLINE
                mark(r, 'request_read', e['ns'])
            elif kind in REPLIES:
                r = recs.get(end + ('o', e['id']))
                if r is not None and 'reply_read' not in r['marks']:
                    mark(r, 'reply_arrived', e['arrived'])
                    mark(r, 'reply_read', e['ns'])
                    r['reader'] = reader(e['thread'])
        elif name == 'flow_msg_out':
            kind = KIND.get(e['kind'])
            if kind in REQUESTS:
                r = recs.get(end + ('o', e['id']))
                if r is not None:
                    r['inline'] = kind in INLINE
                mark(r, 'request_sent', e['ns'])
            elif kind in REPLIES:
                mark(recs.get(end + ('p', e['id'])), 'reply_sent', e['ns'])
        elif name == 'flow_queued':
            r = flows.get(end + (e['flow'],))
            mark(r, 'queued', e['ns'])
            if r is not None and r.get('recv'):
                unposted[end].append(r)
        elif name == 'flow_chunk_posted':
            mark(flows.get(end + (e['flow'],)), 'first_posted', e['ns'])
        elif name == 'flow_pass':
            for r in unposted.pop(end, []):
                mark(r, 'first_posted', e['ns'])
        elif name == 'flow_chunk_done':
            r = flows.get(end + (e['flow'],))
            if r is not None:
                r['marks']['last_chunk'] = e['ns']
    for r in out:
        if r['initiator']:
            call = calls.get((r['conn'], r['side'], r['transfer']), {})
            for step in ('post', 'returned', 'complete'):
                mark(r, step, call.get(step))
    return out


def main():
    args = sys.argv[1:]
    first = 0
    if len(args) == 3 and args[1] == '--first' and args[2].isdigit():
        first = int(args[2])
        args = args[:1]
    if len(args) != 1:
        sys.exit('usage: flow_timeline.py PREFIX [--first N]  (PREFIX: the path prefix of UCCL_TCPX_TRACE)')
    prefix = args[0]
    ends = {}
    for r in records(events(prefix)):
        if r['seq'] is None and not r['inline']:
            continue
        # Each end numbers its own flows from 0: a write each way on one connection shares a
        # seq, and only which end initiated (connector or acceptor) tells them apart. An inline
        # transfer plans no flow: both ends know it by the initiator's id.
        from_connector = r['initiator'] == (r['side'] == 1)
        op = 'write' if r['write'] else 'read'
        which = ('inline', r['xfer']) if r['inline'] else ('flow', r['seq'])
        ends.setdefault((r['conn'], op, from_connector, which), {})['initiator' if r['initiator'] else 'target'] = r
    groups = collections.defaultdict(list)
    unjoined = collections.Counter()
    for (_, op, _, _), pair in ends.items():
        if 'initiator' not in pair or 'target' not in pair:
            unjoined[op] += 1
            continue
        i, t = pair['initiator'], pair['target']
        marks = {f'{tag}.{s}': at for end, tag in ((i, 'i'), (t, 't')) for s, at in end['marks'].items()}
        if 'i.post' not in marks or 'i.complete' not in marks:
            unjoined[op] += 1
            continue
        post = marks['i.post']
        offsets = {k: v - post for k, v in marks.items()}
        offsets['reader'] = i['reader']
        offsets['at'] = post
        groups[(op, i['bytes'])].append(offsets)
    if not groups:
        sys.exit(f'no initiator and target records of {prefix}.*.tsv join ({dict(unjoined)} unmatched)')
    for (op, size), transfers in sorted(groups.items()):
        e2e = [m['i.complete'] for m in transfers]
        what = f'{size} B' if size else 'inline (any size)'
        print(f'{op} {what}: {len(transfers)} joined ({unjoined[op]} unmatched); end-to-end p50 '
              f'{pct(e2e, 0.5) / 1e3:.1f} us (p10 {pct(e2e, 0.1) / 1e3:.1f}, p90 {pct(e2e, 0.9) / 1e3:.1f})')
        names = collections.Counter(k for m in transfers for k in m if k not in ('reader', 'at'))
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
        for who, count in sorted(collections.Counter(m['reader'] for m in transfers).items()):
            waits = [m['i.reply_read'] - m['i.reply_arrived'] for m in transfers
                     if m['reader'] == who and 'i.reply_read' in m and 'i.reply_arrived' in m]
            if waits:
                print(f'  replies read by {names_of.get(who, who)}: {count}, waiting for the lock p50 '
                      f'{pct(waits, 0.5) / 1e3:.1f} us (p90 {pct(waits, 0.9) / 1e3:.1f})')
        for n, m in enumerate(sorted(transfers, key=lambda m: m['at'])[:first]):
            steps = sorted((k for k in m if k not in ('reader', 'at')), key=lambda k: m[k])
            legs = ', '.join(f'{b} +{(m[b] - m[a]) / 1e3:.1f}' for a, b in zip(steps, steps[1:]))
            print(f'  transfer {n + 1}: {m["i.complete"] / 1e3:.1f} us: {legs}')


if __name__ == '__main__':
    main()
