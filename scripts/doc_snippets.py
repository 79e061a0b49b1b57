#!/usr/bin/env python3
"""Runs the code blocks of README.md and docs/*.md that say they run, read from the pages at run
time, so that a page and what is tested cannot drift apart.

A fenced block opts in through words after its language:

    ```python run=SUITE      runs (python: with the suite's interpreter; sh: with bash -e);
                             run=A,B runs in either suite
    ```python file=NAME      is saved as NAME for the page's run blocks to use

SUITE names what the block needs, and the script that has it runs the block:

    python    the uccl_tcpx package and numpy   scripts/python_tests.sh
    nixl      NIXL, numpy, NIXL_PLUGIN_DIR      scripts/nixl_plugin_tests.sh (host memory)
    nixl-gpu  the same with torch and a GPU     scripts/nixl_plugin_gpu_run.sh (the NIXL plugin bundle)

Each page's blocks of a suite run in page order in a fresh folder that holds the page's file=
blocks and is also HOME (a block that writes ~/ writes there). `python` in a sh block is the
suite's interpreter. Any failure, an unknown word or suite on any page, or a suite with no block
at all (its markers lost) fails the run.

    scripts/doc_snippets.py --suite SUITE [--python PY] [--timeout S] [--list] [PAGE...]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SUITES = ("python", "nixl", "nixl-gpu")
FENCE = re.compile(r"^```(\w+)(.*)$")
REPO = Path(__file__).resolve().parent.parent


class Block:
    def __init__(self, page, line, lang, attrs, text):
        self.page, self.line, self.lang, self.text = page, line, lang, text
        self.run = attrs["run"].split(",") if "run" in attrs else []
        self.file = attrs.get("file")

    def where(self):
        return f"{self.page}:{self.line}"


def blocks(page):
    """The page's fenced blocks that carry run= or file=; a malformed word is an error."""
    out, lines, i = [], page.read_text().splitlines(), 0
    rel = page.relative_to(REPO) if page.is_relative_to(REPO) else page
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, words = i + 1, m.group(1), m.group(2).split()
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        attrs = {}
        for word in words:
            key, eq, value = word.partition("=")
            if not eq or key not in ("run", "file") or not value:
                raise SystemExit(f"{rel}:{start}: unknown word {word!r} after ```{lang} (run=SUITE or file=NAME)")
            attrs[key] = value
        for suite in attrs.get("run", "").split(",") if "run" in attrs else []:
            if suite not in SUITES:
                raise SystemExit(f"{rel}:{start}: unknown suite {suite!r} (one of {', '.join(SUITES)})")
        if "run" in attrs and lang not in ("python", "sh"):
            raise SystemExit(f"{rel}:{start}: only python and sh blocks run, not {lang}")
        if "file" in attrs and "/" in attrs["file"]:
            raise SystemExit(f"{rel}:{start}: file={attrs['file']} must be a plain name")
        if attrs:
            out.append(Block(rel, start, lang, attrs, "\n".join(body) + "\n"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True, choices=SUITES)
    ap.add_argument("--python", default=sys.executable, help="the interpreter the blocks run with")
    ap.add_argument("--timeout", type=int, default=int(os.environ.get("DOC_SNIPPETS_TIMEOUT", "300")))
    ap.add_argument("--list", action="store_true", help="list the suite's blocks, run nothing")
    ap.add_argument("pages", nargs="*", type=Path)
    args = ap.parse_args()
    pages = args.pages or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = {page: blocks(page.resolve()) for page in pages}  # every page is checked, whatever the suite

    # The interpreter as named, not resolved: a virtual environment's python is a symlink.
    python = os.path.abspath(args.python if "/" in args.python else (shutil.which(args.python) or args.python))
    ran = 0
    for page, page_blocks in found.items():
        runs = [b for b in page_blocks if args.suite in b.run]
        if not runs:
            continue
        if args.list:
            for b in runs:
                print(f"{b.where()} {b.lang}")
            ran += len(runs)
            continue
        with tempfile.TemporaryDirectory(prefix="doc-snippets-") as work:
            for b in page_blocks:
                if b.file:
                    Path(work, b.file).write_text(b.text)
            env = dict(os.environ, HOME=work, PATH=f"{os.path.dirname(python)}:{os.environ['PATH']}")
            env.pop("PYTHONHOME", None)
            for n, b in enumerate(runs):
                print(f"=== {b.where()} ({b.lang}, suite {args.suite}) ===", flush=True)
                if b.lang == "python":
                    script = Path(work, f"_block{n}.py")
                    script.write_text(b.text)
                    cmd = [python, script.name]
                else:
                    cmd = ["bash", "-euo", "pipefail", "-c", b.text]
                try:
                    rc = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, timeout=args.timeout).returncode
                except subprocess.TimeoutExpired:
                    raise SystemExit(f"doc snippets: {b.where()} ran past {args.timeout} s (DOC_SNIPPETS_TIMEOUT)")
                if rc != 0:
                    raise SystemExit(f"doc snippets: {b.where()} failed (exit {rc}):\n{b.text}")
                ran += 1
    if ran == 0:
        raise SystemExit(f"doc snippets: no block of suite {args.suite} in the {len(pages)} pages read")
    if not args.list:
        print(f"doc snippets ({args.suite}): {ran} ran, all passed")


if __name__ == "__main__":
    main()
