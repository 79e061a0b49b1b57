"""The opt-in alias: `from uccl import p2p` gives ours only with the printed folder on PYTHONPATH,
in child processes too, and a real `uccl` further down the path keeps its other modules."""

import ast
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import uccl_tcpx
from conftest import run_python


def alias_dir():
    out = subprocess.run([sys.executable, "-m", "uccl_tcpx.alias"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_command_prints_the_packaged_folder():
    folder = alias_dir()
    assert folder == uccl_tcpx.alias_path()
    assert os.path.isfile(os.path.join(folder, "uccl", "__init__.py"))
    script = shutil.which("uccl-tcpx-alias", path=os.path.dirname(sys.executable))
    assert script, "the console script is installed next to the interpreter"
    assert subprocess.run([script], capture_output=True, text=True, check=True).stdout.strip() == folder
    bad = subprocess.run([sys.executable, "-m", "uccl_tcpx.alias", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_nothing_named_uccl_is_installed():
    site = os.path.dirname(os.path.dirname(os.path.abspath(uccl_tcpx.__file__)))
    assert not os.path.exists(os.path.join(site, "uccl"))
    env = {"PYTHONPATH": ""}
    result = run_python("import uccl_tcpx.p2p\ntry:\n import uccl\nexcept ImportError:\n print('absent')", env)
    if "absent" not in result.stdout:
        pytest.skip("another package named uccl is installed in this environment")
    assert result.returncode == 0


CHECK = textwrap.dedent(
    """
    import multiprocessing, subprocess, sys
    from uccl import p2p
    import uccl_tcpx.p2p
    assert p2p is uccl_tcpx.p2p
    import uccl.p2p
    assert uccl.p2p is uccl_tcpx.p2p
    ep = p2p.Endpoint(local_gpu_idx=0)
    assert repr(ep) == "<UCCL P2P Endpoint>"
    ep.close()
    child = subprocess.run([sys.executable, "-c", "from uccl import p2p; print(p2p.__name__)"],
                           capture_output=True, text=True)
    print("child", child.stdout.strip())
    """
)


def test_the_alias_resolves_to_ours_in_children_too():
    env = {"PYTHONPATH": alias_dir(), "UCCL_TCPX_ALIAS_QUIET": "1"}
    result = run_python(CHECK, env)
    assert result.returncode == 0, result.stderr
    assert "child uccl_tcpx.p2p" in result.stdout
    assert "uccl.p2p -> uccl-tcpx" not in result.stderr
    loud = run_python("from uccl import p2p", {"PYTHONPATH": alias_dir()})
    assert loud.returncode == 0 and "uccl.p2p -> uccl-tcpx" in loud.stderr


def test_a_real_uccl_further_down_keeps_its_other_modules(tmp_path):
    real = tmp_path / "site" / "uccl"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("raise RuntimeError('the real package body must not run')\n")
    (real / "utils.py").write_text("MARK = 'real utils'\n")
    (real / "p2p.py").write_text("raise RuntimeError('the real p2p must not load')\n")
    env = {"PYTHONPATH": os.pathsep.join([alias_dir(), str(tmp_path / "site")]), "UCCL_TCPX_ALIAS_QUIET": "1"}
    code = "from uccl import p2p\nimport uccl_tcpx.p2p\nassert p2p is uccl_tcpx.p2p\nfrom uccl import utils\nprint(utils.MARK)"
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "real utils"
    # Without the alias folder, the real package is what `uccl` is.
    plain = run_python("import uccl", {"PYTHONPATH": str(tmp_path / "site")})
    assert "the real package body must not run" in plain.stderr


MAPPED = (
    "import uccl_tcpx, os\n"
    "paths = {l.split()[-1] for l in open('/proc/self/maps') if 'libuccl_tcpx' in l}\n"
    "print(sorted(paths), uccl_tcpx.lib_path())\n"
)


def test_one_engine_library_the_packaged_one_or_uccl_tcpx_lib(tmp_path):
    result = run_python(MAPPED)
    assert result.returncode == 0, result.stderr
    mapped, expected = result.stdout.rsplit(" ", 1)
    assert ast.literal_eval(mapped) == [os.path.realpath(expected.strip())], "one copy, the one inside the package"
    package = os.path.dirname(uccl_tcpx.__file__)
    (ext,) = [f for f in os.listdir(package) if f.startswith("_engine")]
    with open(os.path.join(package, ext), "rb") as f:
        assert b"libuccl_tcpx.so" not in f.read(), "the extension has no DT_NEEDED on the engine"
    moved = tmp_path / "libuccl_tcpx.so.0"
    shutil.copy(uccl_tcpx.lib_path(), moved)
    result = run_python(MAPPED, {"UCCL_TCPX_LIB": str(moved)})
    assert result.returncode == 0, result.stderr
    assert ast.literal_eval(result.stdout.rsplit(" ", 1)[0]) == [str(moved)]
    missing = run_python("import uccl_tcpx", {"UCCL_TCPX_LIB": str(tmp_path / "nope.so")})
    assert missing.returncode != 0 and "cannot open the uccl-tcpx engine library" in missing.stderr
