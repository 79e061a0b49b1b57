#!/usr/bin/env python3
"""How evenly a transfer's bytes spread over a send comm's sockets, from the tables comms write
under UCCL_TCPX_TRACE_SOCKETS=PREFIX (see socket_timeline.py). Each send table's requests of the
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
import glob
import os
import sys


def rows(path):
    with open(path) as f:
        header = f.readline().rstrip('\n').split('\t')
        return [dict(zip(header, map(int, line.rstrip('\n').split('\t')))) for line in f if line.strip()]


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    prefix, n, sockets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    used, ratio, tail = [], [], []
    slow_bytes, late, late_take, first_req, span_ratio, rate_ratio = [], [], [], [], [], []
    comms = []
    for send_path in glob.glob(glob.escape(prefix) + '.*.*.send.tsv'):
        send = rows(send_path)
        totals = collections.Counter()
        for r in send:
            totals[r['seq']] += r['bytes']
        if totals:
            comms.append((send_path, send, totals))
    # Only the comms that carried the largest requests of all: the other direction's comms carry
    # only small ones (a run's replies), whose balance says nothing of the transfers.
    largest = max((max(t.values()) for _, _, t in comms), default=0)
    for send_path, send, totals in comms:
        comm = os.path.basename(send_path).split('.')[-3]
        recv_paths = glob.glob(glob.escape(prefix) + f'.*.{comm}.recv.tsv')
        recv = {(r['seq'], r['socket']): r for p in recv_paths for r in rows(p)}
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
        sys.exit(f'no send tables under {prefix}')
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
