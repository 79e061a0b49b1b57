"""Prints the folder that makes ``from uccl import p2p`` give uccl-tcpx's module.

    export PYTHONPATH="$(python -m uccl_tcpx.alias)${PYTHONPATH:+:$PYTHONPATH}"

Only processes started with that folder first on ``PYTHONPATH`` see the alias (torchrun workers,
multiprocessing children and subprocesses inherit it); nothing is installed as ``uccl``. Where
UCCL's own wheel is installed too, its other modules (``uccl.utils``, ...) stay reachable.
"""

import sys

from . import alias_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--path"]):
        print("usage: python -m uccl_tcpx.alias [--path]", file=sys.stderr)
        return 2
    print(alias_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
