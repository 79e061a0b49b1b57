"""Reads the files a process writes under UCCL_TCPX_TRACE=PREFIX (`PREFIX.<pid>.tsv`, one per
process; docs/TRACE.md): the schema at each file's head names every event's fields, so this module
knows no event of its own. The other scripts of this folder import it.

  events(prefix)   every event of every file, sorted by time: dicts with `event`, `ns`, `tid`,
                   `pid`, `thread` (the thread's name) and the event's fields (ints)
  codes(prefix)    {field: {value: name}} of the coded fields (`by`, `kind`, `step`)
"""
import glob
import os
import sys

FORMAT = '# uccl-tcpx trace 1'


def files(prefix):
    return sorted(glob.glob(glob.escape(prefix) + '.*.tsv'))


def read(path):
    """(events, codes) of one file."""
    schema, codes, threads, out, pid = {}, {}, {}, [], 0
    with open(path) as f:
        if f.readline().rstrip('\n') != FORMAT:
            sys.exit(f'{path}: not a trace file of this format ({FORMAT!r})')
        for line in f:
            parts = line.rstrip('\n').split('\t')
            if parts[0] == '# event':
                schema[parts[1]] = parts[2:]
            elif parts[0] == '# code':
                codes.setdefault(parts[1], {})[int(parts[2])] = parts[3]
            elif parts[0] == '# thread':
                threads[int(parts[1])] = parts[2]
            elif parts[0] == '# pid':
                pid = int(parts[1])
            elif not parts[0].startswith('#'):
                fields = schema.get(parts[0])
                if fields is None:
                    sys.exit(f'{path}: event {parts[0]!r} is not in the schema')
                e = dict(zip(fields, map(int, parts[3:])))
                e.update(event=parts[0], ns=int(parts[1]), tid=int(parts[2]), pid=pid)
                out.append(e)
    for e in out:
        e['thread'] = threads.get(e['tid'], '-')
    return out, codes


def events(prefix, names=None):
    """Every event of the files under `prefix` (only those named in `names`, if given), by time."""
    paths = files(prefix)
    if not paths:
        sys.exit(f'no trace files {prefix}.*.tsv')
    out = []
    for path in paths:
        evs, _ = read(path)
        out.extend(e for e in evs if names is None or e['event'] in names)
    out.sort(key=lambda e: e['ns'])
    return out


def codes(prefix):
    paths = files(prefix)
    return read(paths[0])[1] if paths else {}


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]

