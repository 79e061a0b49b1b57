#!/usr/bin/env python3
"""How a socket comm's sockets shared each request: reads the `socket` events of the files a trace
writes (UCCL_TCPX_TRACE=PREFIX or socket:PREFIX, `PREFIX.<pid>.tsv`), builds each comm's send and
receive table (a row per request and socket; the comm id is the one both ends' hellos carry, so a
send table and its receive table pair exactly) and prints, per request size and overall, the
median, p10 and p90 of:
  sockets      sockets that carried a piece of the request
  pieces max   most pieces one socket carried; pieces mean: pieces / sockets (balance)
  start off    each socket's first piece taken, after the request's first (sender)
  transit      a socket's first header read minus its sender taking that piece (transit + wake-up; the
               header is timed when parsed, so bytes of an earlier piece ahead of it count too)
  held         admitted minus header read (the header waited for the receive to be posted)
  send span    a socket's first piece taken to its last written
  recv span    a socket's first header read to its last piece landed
  lag          a socket's last piece landed minus its last written
  end to end   the request's first piece taken to its last piece landed (any socket)
Times in microseconds. Both ends use CLOCK_MONOTONIC: cross-end legs (transit, lag, end to end) are
exact on one host, meaningless across hosts.
  UCCL_TCPX_TRACE=socket:/tmp/sock <run both ends>
  scripts/diag/socket_timeline.py /tmp/sock"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_events import events, pct  # noqa: E402


def tables(prefix):
    """{comm id: {'send': rows, 'recv': rows}}, rows {(seq, socket): {column: int}}: a sender's row
    has its first piece taken (start_ns), its last written (last_ns), bytes and pieces; a
    receiver's its first header read (header_ns), first piece admitted (admitted_ns), last landed
    (last_ns), bytes and pieces."""
    found = collections.defaultdict(lambda: {'send': {}, 'recv': {}})
    names = {'sock_take', 'sock_sent', 'sock_header', 'sock_admit', 'sock_landed'}
    for e in events(prefix, names):
        side = 'send' if e['event'] in ('sock_take', 'sock_sent') else 'recv'
        row = found[e['comm']][side].setdefault((e['seq'], e['socket']), {
            'seq': e['seq'], 'socket': e['socket'], 'start_ns': 0, 'header_ns': 0, 'admitted_ns': 0,
            'last_ns': 0, 'bytes': 0, 'pieces': 0})
        first = {'sock_take': 'start_ns', 'sock_header': 'header_ns', 'sock_admit': 'admitted_ns'}.get(e['event'])
        if first:
            row[first] = row[first] or e['ns']
        else:
            row['last_ns'] = e['ns']
            row['bytes'] += e['bytes']
            row['pieces'] += 1
    # Rows of sockets that finished no piece (a request cut off) say nothing of how it moved.
    for comm in found.values():
        for side in comm.values():
            for key in [k for k, r in side.items() if r['pieces'] == 0]:
                del side[key]
    return found


def size_label(n):
    for unit, shift in (('MiB', 20), ('KiB', 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f'{n >> shift} {unit}'
    return f'{n} B'


def requests(send, recv):
    """Per request of one comm: its size and each metric's samples."""
    by_seq = collections.defaultdict(list)
    for (seq, k) in send:
        if (seq, k) in recv:
            by_seq[seq].append(k)
    for seq, ks in sorted(by_seq.items()):
        s = [send[(seq, k)] for k in ks]
        r = [recv[(seq, k)] for k in ks]
        first = min(x['start_ns'] for x in s)
        pieces = [x['pieces'] for x in s]
        m = {
            'sockets': [len(ks)],
            'pieces max': [max(pieces)],
            'pieces mean': [sum(pieces) / len(pieces)],
            'start off': [(x['start_ns'] - first) / 1e3 for x in s],
            'transit': [(y['header_ns'] - x['start_ns']) / 1e3 for x, y in zip(s, r)],
            'held': [(y['admitted_ns'] - y['header_ns']) / 1e3 for y in r],
            'send span': [(x['last_ns'] - x['start_ns']) / 1e3 for x in s],
            'recv span': [(y['last_ns'] - y['header_ns']) / 1e3 for y in r],
            'lag': [(y['last_ns'] - x['last_ns']) / 1e3 for x, y in zip(s, r)],
            'end to end': [(max(y['last_ns'] for y in r) - first) / 1e3],
        }
        yield sum(x['bytes'] for x in s), m


def report(label, count, samples):
    print(f'== {label}: {count} requests')
    print(f'  {"":12} {"p50":>10} {"p10":>10} {"p90":>10}')
    for name, v in samples.items():
        if v:
            print(f'  {name:12} {pct(v, 0.5):10.2f} {pct(v, 0.1):10.2f} {pct(v, 0.9):10.2f}')


def main():
    if len(sys.argv) != 2:
        sys.exit('usage: socket_timeline.py PREFIX  (the path prefix of UCCL_TCPX_TRACE)')
    prefix = sys.argv[1]
    found = tables(prefix)
    paired = {c: t for c, t in found.items() if t['send'] and t['recv']}
    unpaired = len(found) - len(paired)
    if not paired:
        sys.exit(f'no comm of {prefix}.*.tsv has both ends traced ({unpaired} unpaired)')
    by_size = collections.defaultdict(lambda: collections.defaultdict(list))
    counts = collections.Counter()
    for tab in paired.values():
        for size, m in requests(tab['send'], tab['recv']):
            counts[size] += 1
            for name, v in m.items():
                by_size[size][name].extend(v)
                by_size[None][name].extend(v)
    print(f'{len(paired)} comms paired by comm id' + (f', {unpaired} without their peer' if unpaired else ''))
    for size in sorted(s for s in by_size if s is not None):
        report(size_label(size), counts[size], by_size[size])
    report('all sizes', sum(counts.values()), by_size[None])


if __name__ == '__main__':
    main()
