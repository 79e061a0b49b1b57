#!/usr/bin/env python3
"""How evenly a transfer's bytes spread over a send comm's sockets, from the tables comms write
under UCCL_TCPX_TRACE_SOCKETS=PREFIX (see socket_timeline.py). Each send table's requests of its
largest size are taken in runs of N (a transfer's chunks on that comm: a 16 MiB transfer with 2 MiB
chunks over two channels puts 4 on each), and for each run it prints:
  sockets used   sockets that carried any of the run's pieces
  max/mean       bytes of the busiest socket over the mean of the comm's S sockets (1.00: even)
  last landing   the receiver's last piece on the slowest socket minus that on the median socket
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
    for send_path in glob.glob(glob.escape(prefix) + '.*.*.send.tsv'):
        comm = os.path.basename(send_path).split('.')[-3]
        recv_paths = glob.glob(glob.escape(prefix) + f'.*.{comm}.recv.tsv')
        recv = {(r['seq'], r['socket']): r for p in recv_paths for r in rows(p)}
        send = rows(send_path)
        totals = collections.Counter()
        for r in send:
            totals[r['seq']] += r['bytes']
        if not totals:
            continue
        largest = max(totals.values())
        seqs = sorted(s for s, b in totals.items() if b == largest)
        for i in range(0, len(seqs) - n + 1, n):
            run = set(seqs[i:i + n])
            per_socket = collections.Counter()
            landed = collections.defaultdict(int)
            for r in send:
                if r['seq'] in run:
                    per_socket[r['socket']] += r['bytes']
                    peer = recv.get((r['seq'], r['socket']))
                    if peer:
                        landed[r['socket']] = max(landed[r['socket']], peer['last_ns'])
            used.append(len(per_socket))
            ratio.append(max(per_socket.values()) / (sum(per_socket.values()) / sockets))
            if len(landed) > 1:
                last = sorted(landed.values())
                tail.append((last[-1] - last[len(last) // 2]) / 1000)
    if not used:
        sys.exit(f'no send tables under {prefix}')
    print(f'{len(used)} runs of {n} requests')
    print(f'  sockets used   p10 {pct(used, .1)}  p50 {pct(used, .5)}  p90 {pct(used, .9)}')
    print(f'  max/mean       p10 {pct(ratio, .1):.2f}  p50 {pct(ratio, .5):.2f}  p90 {pct(ratio, .9):.2f}')
    if tail:
        print(f'  last landing   p10 {pct(tail, .1):.1f}  p50 {pct(tail, .5):.1f}  p90 {pct(tail, .9):.1f} us')


if __name__ == '__main__':
    main()
