#!/usr/bin/env python3
"""Compares settings of the benchmark the way the performance log does: runs `uccl-tcpx-bench`
with the same arguments under each setting in turn, N times over (so that a machine's drift falls
on every setting alike), and prints per op and size the median of each setting's invocations with
their range: the message ratio (ours over acknowledged raw messages, the bench's `msg` ratio),
else GB/s where the bench ran without its baseline, and the p50 round trip in microseconds.

  alternate.py [--times N] [--keep DIR] [--timeout S] SETTING... -- BENCH_ARGS...
  SETTING: NAME=VAR=VALUE,VAR=VALUE,...   (BIN=PATH picks the bench binary; default
           target/release/uccl-tcpx-bench, or $BENCH)
  e.g. alternate.py --times 5 base= poll=UCCL_TCPX_PROGRESS_POLL_US=100 \\
           -- --sizes 512K,1M --ops write,read --rounds 3

Confine both ends to some CPUs by running the script under `taskset`: the bench's processes
inherit the mask, and the library sizes itself from it. --keep DIR writes every invocation's
output to DIR/<round>-<name>.txt. An invocation that fails or prints no table ends the script
with its output: a setting that does not run is not a setting measured."""
import argparse
import os
import statistics
import subprocess
import sys

UNITS = {'B': 1, 'KiB': 1 << 10, 'MiB': 1 << 20, 'GiB': 1 << 30}


def settings(specs):
    out = []
    for spec in specs:
        name, eq, rest = spec.partition('=')
        if not name or not eq:
            sys.exit(f'setting {spec!r}: expected NAME=VAR=VALUE,... (or NAME= for the defaults)')
        env, binary = dict(os.environ), os.environ.get('BENCH', 'target/release/uccl-tcpx-bench')
        for pair in filter(None, rest.split(',')):
            var, eq, value = pair.partition('=')
            if not var or not eq:
                sys.exit(f'setting {spec!r}: {pair!r} is not VAR=VALUE')
            if var == 'BIN':
                binary = value
            else:
                env[var] = value
        if any(name == n for n, _, _ in out):
            sys.exit(f'setting {name!r} named twice')
        out.append((name, env, binary))
    return out


def table(text):
    """{(op, size in bytes, size as printed): (figure, p50 us, what the figure is)} of the bench's
    summary: the message ratio, or GB/s where the row has no baseline."""
    rows, inside = {}, False
    for line in text.splitlines():
        f = line.split()
        if f[:2] == ['op', 'size']:
            inside = True
            continue
        if not inside or len(f) < 10 or f[2] not in UNITS:
            continue
        kind, figure = ('msg', f[7]) if f[7] != '-' else ('GB/s', f[3])
        rows[(f[0], int(f[1]) * UNITS[f[2]], f'{f[1]} {f[2]}')] = (float(figure), float(f[8]), kind)
    return rows


def main():
    argv = sys.argv[1:]
    if '--' not in argv:
        sys.exit(__doc__)
    cut = argv.index('--')
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument('--times', type=int, default=3)
    p.add_argument('--keep')
    p.add_argument('--timeout', type=float, default=600)
    p.add_argument('setting', nargs='+')
    args = p.parse_args(argv[:cut])
    bench_args = argv[cut + 1:]
    if args.times < 1:
        sys.exit('--times must be at least 1')
    runs = settings(args.setting)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    got = {}
    for round_ in range(args.times):
        for name, env, binary in runs:
            try:
                run = subprocess.run([binary, *bench_args], env=env, capture_output=True, text=True,
                                     timeout=args.timeout)
            except subprocess.TimeoutExpired:
                sys.exit(f'{name}, round {round_}: no answer within {args.timeout:.0f} s')
            except OSError as e:
                sys.exit(f'{name}: cannot run {binary}: {e}')
            text = run.stdout + run.stderr
            if args.keep:
                with open(os.path.join(args.keep, f'{round_}-{name}.txt'), 'w') as f:
                    f.write(text)
            rows = table(run.stdout)
            if run.returncode != 0 or not rows:
                sys.exit(f'{name}, round {round_}: the bench exited {run.returncode}'
                         f'{"" if rows else " without a summary table"}:\n{text}')
            for key, value in rows.items():
                got.setdefault(key, {}).setdefault(name, []).append(value)
            print(f'# round {round_ + 1}/{args.times}: {name} done', file=sys.stderr, flush=True)
    print(f'# msg ratio (GB/s where the bench ran without its baseline): median [min-max] of '
          f'{args.times} alternated invocations; p50 us: median')
    for (op, _, size), by in sorted(got.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cells = []
        for name, _, _ in runs:
            values = by.get(name)
            if not values:
                cells.append(f'{name}: -')
                continue
            figures = [v[0] for v in values]
            cells.append(f'{name}: {statistics.median(figures):.2f} [{min(figures):.2f}-{max(figures):.2f}]'
                         f' p50 {statistics.median(v[1] for v in values):.1f}')
        kinds = {v[2] for values in by.values() for v in values}
        print(f'{op:<6} {size:>8} {"/".join(sorted(kinds)):>4} | ' + ' | '.join(cells))


if __name__ == '__main__':
    main()
