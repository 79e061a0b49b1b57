#!/usr/bin/env python3
"""How evenly a transfer's bytes spread over a send comm's sockets, from the `socket` events of a
trace under UCCL_TCPX_TRACE=PREFIX (the tables socket_timeline.py builds). Each send table's requests of the
largest size in any table are taken in runs of N (a transfer's chunks on that comm: a 16 MiB
transfer with 2 MiB chunks over two channels puts 4 on each), and for each run it prints:
  sockets used   sockets that carried any of the run's pieces
  max/mean       bytes of the busiest socket over the mean of the comm's S sockets (1.00: even)
  last landing   the receiver's last piece on the slowest socket minus that on the median socket
and, for the slowest socket (the last to land), what made it last:
  its bytes      its bytes over the comm's mean
  late start     its first header read minus the run's first header read on any socket
  late take      its sender's first piece taken minus the run's first taken on any socket
  first request  which of the run's N requests (0 = the first) gave it its first piece
  its span       its first header read to its last piece landed, over the median socket's span
  its rate       its bytes per microsecond of span, over the median socket's
Percentiles p10 / p50 / p90 over all runs of all comms.
  scripts/diag/socket_balance.py PREFIX N S"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from socket_timeline import tables  # noqa: E402
from trace_events import pct  # noqa: E402


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    prefix, n, sockets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    used, ratio, tail = [], [], []
    slow_bytes, late, late_take, first_req, span_ratio, rate_ratio = [], [], [], [], [], []
    comms = []
    for comm, tab in tables(prefix).items():
        send = sorted(tab['send'].values(), key=lambda r: (r['seq'], r['socket']))
        totals = collections.Counter()
        for r in send:
            totals[r['seq']] += r['bytes']
        if totals:
            comms.append((tab['recv'], send, totals))
    # Only the comms that carried the largest requests of all: the other direction's comms carry
    # only small ones (a run's replies), whose balance says nothing of the transfers.
    largest = max((max(t.values()) for _, _, t in comms), default=0)
    for recv, send, totals in comms:
        seqs = sorted(s for s, b in totals.items() if b == largest)
        for i in range(0, len(seqs) - n + 1, n):
            run = set(seqs[i:i + n])
            per_socket = collections.Counter()
            landed = collections.defaultdict(int)
            first, taken = {}, {}
            for r in send:
                if r['seq'] in run:
                    k = r['socket']
                    per_socket[k] += r['bytes']
                    taken[k] = min(taken.get(k, r['start_ns']), r['start_ns'])
                    peer = recv.get((r['seq'], k))
                    if peer:
                        landed[k] = max(landed[k], peer['last_ns'])
                        first[k] = min(first.get(k, peer['header_ns']), peer['header_ns'])
            used.append(len(per_socket))
            mean = sum(per_socket.values()) / sockets
            ratio.append(max(per_socket.values()) / mean)
            if len(landed) > 1:
                last = sorted(landed.values())
                tail.append((last[-1] - last[len(last) // 2]) / 1000)
                slow = max(landed, key=landed.get)
                spans = {k: max(landed[k] - first[k], 1) for k in landed}
                rates = {k: per_socket[k] / spans[k] for k in landed}
                median = lambda d: sorted(d.values())[len(d) // 2]
                slow_bytes.append(per_socket[slow] / mean)
                late.append((first[slow] - min(first.values())) / 1000)
                late_take.append((taken[slow] - min(taken.values())) / 1000)
                order = sorted(run)
                first_req.append(min(order.index(r['seq']) for r in send if r['seq'] in run and r['socket'] == slow))
                span_ratio.append(spans[slow] / median(spans))
                rate_ratio.append(rates[slow] / median(rates))
    if not used:
        sys.exit(f'no socket sends traced under {prefix}')
    print(f'{len(used)} runs of {n} requests')
    print(f'  sockets used   p10 {pct(used, .1)}  p50 {pct(used, .5)}  p90 {pct(used, .9)}')
    print(f'  max/mean       p10 {pct(ratio, .1):.2f}  p50 {pct(ratio, .5):.2f}  p90 {pct(ratio, .9):.2f}')
    if tail:
        print(f'  last landing   p10 {pct(tail, .1):.1f}  p50 {pct(tail, .5):.1f}  p90 {pct(tail, .9):.1f} us')
        print('the slowest socket:')
        print(f'  its bytes      p10 {pct(slow_bytes, .1):.2f}  p50 {pct(slow_bytes, .5):.2f}  p90 {pct(slow_bytes, .9):.2f}')
        print(f'  late start     p10 {pct(late, .1):.1f}  p50 {pct(late, .5):.1f}  p90 {pct(late, .9):.1f} us')
        print(f'  late take      p10 {pct(late_take, .1):.1f}  p50 {pct(late_take, .5):.1f}  p90 {pct(late_take, .9):.1f} us')
        print(f'  first request  p10 {pct(first_req, .1)}  p50 {pct(first_req, .5)}  p90 {pct(first_req, .9)}')
        print(f'  its span       p10 {pct(span_ratio, .1):.2f}  p50 {pct(span_ratio, .5):.2f}  p90 {pct(span_ratio, .9):.2f}')
        print(f'  its rate       p10 {pct(rate_ratio, .1):.2f}  p50 {pct(rate_ratio, .5):.2f}  p90 {pct(rate_ratio, .9):.2f}')


if __name__ == '__main__':
    main()
