#!/usr/bin/env python3
"""Compares settings of the benchmark the way the performance log does: runs `uccl-tcpx-bench`
with the same arguments under each setting in turn, N times over (so that a machine's drift falls
on every setting alike), and prints per op and size the median of each setting's invocations with
their range: the message ratio (ours over acknowledged raw messages, the bench's `msg` ratio) with
both sides' GB/s, else GB/s where the bench ran without its baseline, and the p50 round trip in
microseconds. The anchor's GB/s is printed because on a small host it can move between
invocations by more than ours does (two CPUs of one machine: 128 KiB messages at 2.7-3.4 or 4.5-6.1
GB/s by invocation), and a ratio's spread is then the anchor's.

  alternate.py [--times N] [--keep DIR] [--timeout S] SETTING... -- BENCH_ARGS...
  SETTING: NAME=VAR=VALUE,VAR=VALUE,...   (BIN=PATH picks the bench binary; default
           target/release/uccl-tcpx-bench, or $BENCH)
  e.g. alternate.py --times 5 base= poll=UCCL_TCPX_PROGRESS_POLL_US=100 \\
           -- --sizes 512K,1M --ops write,read --rounds 3

Confine both ends to some CPUs by running the script under `taskset`: the bench's processes
inherit the mask, and the library sizes itself from it. Figures come from the bench's own
`--json-file` (so BENCH_ARGS must not name one). --keep DIR writes every invocation's output and
results to DIR/<round>-<name>.txt and .json. An invocation that fails or leaves no results ends
the script with its output: a setting that does not run is not a setting measured."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


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


def human(size):
    for unit, shift in (('GiB', 30), ('MiB', 20), ('KiB', 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f'{size >> shift} {unit}'
    return f'{size} B'


def results(path):
    """{(op, size): (figure, p50 us, what the figure is, ours GB/s, the anchor's GB/s or None)} of
    one `--json-file`: the figure is the message ratio, or GB/s where the run had no baseline."""
    with open(path) as f:
        rows = json.load(f)['results']
    out = {}
    for r in rows:
        kind, figure = ('msg', r['msg_ratio']) if r['msg_ratio'] is not None else ('GB/s', r['gb_per_s'])
        out[(r['op'], r['size'])] = (figure, r['p50_us'], kind, r['gb_per_s'], r['raw_msg_gb_per_s'])
    return out


def spread(values):
    """median [min-max] of `values`."""
    return f'{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]'


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
    if any(a == '--json-file' or a.startswith('--json-file=') for a in bench_args):
        sys.exit('leave --json-file out: each invocation is given its own')
    if args.times < 1:
        sys.exit('--times must be at least 1')
    runs = settings(args.setting)
    keep = os.path.abspath(args.keep) if args.keep else None
    if keep:
        os.makedirs(keep, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='alternate-') as scratch:
        got = collect(args, runs, bench_args, keep or scratch, keep)
    report(args.times, runs, got)


def collect(args, runs, bench_args, json_dir, keep):
    """{(op, size): {setting: [results() row per invocation]}} over every round."""
    got = {}
    for round_ in range(args.times):
        for name, env, binary in runs:
            json_file = os.path.join(json_dir, f'{round_}-{name}.json')
            if os.path.exists(json_file):
                os.remove(json_file)
            try:
                run = subprocess.run([binary, *bench_args, '--json-file', json_file], env=env,
                                     capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                sys.exit(f'{name}, round {round_}: no answer within {args.timeout:.0f} s')
            except OSError as e:
                sys.exit(f'{name}: cannot run {binary}: {e}')
            text = run.stdout + run.stderr
            if keep:
                with open(os.path.join(keep, f'{round_}-{name}.txt'), 'w') as f:
                    f.write(text)
            rows = results(json_file) if run.returncode == 0 and os.path.exists(json_file) else {}
            if not rows:
                sys.exit(f'{name}, round {round_}: the bench exited {run.returncode} without results:\n{text}')
            for key, value in rows.items():
                got.setdefault(key, {}).setdefault(name, []).append(value)
            print(f'# round {round_ + 1}/{args.times}: {name} done', file=sys.stderr, flush=True)
    return got


def report(times, runs, got):
    print(f'# msg ratio, then ours and the anchor in GB/s (GB/s alone where the bench ran without its '
          f'baseline): median [min-max] of {times} alternated invocations; p50 us: median')
    for (op, size), by in sorted(got.items()):
        cells = []
        for name, _, _ in runs:
            values = by.get(name)
            if not values:
                cells.append(f'{name}: -')
                continue
            cell = f'{name}: {spread([v[0] for v in values])}'
            if all(v[4] is not None for v in values):
                cell += f' ours {spread([v[3] for v in values])} anchor {spread([v[4] for v in values])}'
            cells.append(cell + f' p50 {statistics.median(v[1] for v in values):.1f}')
        kinds = {v[2] for values in by.values() for v in values}
        print(f'{op:<6} {human(size):>8} {"/".join(sorted(kinds)):>4} | ' + ' | '.join(cells))


if __name__ == '__main__':
    main()
