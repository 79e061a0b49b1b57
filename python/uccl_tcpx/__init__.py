"""uccl-tcpx for Python: UCCL's ``p2p.Endpoint`` over the uccl-tcpx engine.

``from uccl_tcpx import p2p`` gives the drop-in module. ``python -m uccl_tcpx.alias`` prints a
folder that, put first on ``PYTHONPATH``, makes ``from uccl import p2p`` resolve to it as well.
"""

import os as _os

__all__ = ["lib_dir", "lib_path", "alias_path", "__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("uccl-tcpx")
except Exception:  # not installed as a distribution (a source tree on sys.path)
    __version__ = "0.0.0+unknown"


def lib_dir():
    """The folder holding the engine library this package carries (libuccl_tcpx.so.0)."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "lib")


def lib_path():
    """The engine library this process uses: ``UCCL_TCPX_LIB`` if set, else the packaged one."""
    return _os.environ.get("UCCL_TCPX_LIB") or _os.path.join(lib_dir(), "libuccl_tcpx.so.0")


def alias_path():
    """The folder to put first on ``PYTHONPATH`` so that ``from uccl import p2p`` gives ours."""
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "_alias")


from . import _engine  # noqa: E402

_engine.load(lib_path())
