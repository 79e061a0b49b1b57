"""Opt-in alias: this ``uccl`` package is uccl-tcpx's, and ``uccl.p2p`` is ``uccl_tcpx.p2p``.

It is found only when its parent folder (``python -m uccl_tcpx.alias``) precedes site-packages on
``sys.path``. A real UCCL installed further down the path keeps its other modules reachable: its
package folder is appended to this package's search path. Set UCCL_TCPX_ALIAS_QUIET=1 to silence
the one line this prints to stderr.
"""

import importlib.machinery as _machinery
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
_rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
_real = _machinery.PathFinder.find_spec("uccl", _rest)
if _real is not None and _real.submodule_search_locations:
    __path__ = [_here, *_real.submodule_search_locations]

from uccl_tcpx import __version__ as _version  # noqa: E402
from uccl_tcpx import p2p  # noqa: E402

_sys.modules[__name__ + ".p2p"] = p2p

if _os.environ.get("UCCL_TCPX_ALIAS_QUIET") != "1":
    print(f"uccl.p2p -> uccl-tcpx {_version}", file=_sys.stderr)
