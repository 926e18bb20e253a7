"""Copy committed result tables into the docs, so a page never quotes a table its file no longer holds.

A docs page marks a quoted table with two comments:

    <!-- table: benchmarks/results/leaderboard_fold1_full/LEADERBOARD.md -->
    ...
    <!-- /table -->

and between them holds the named file's tables: its lines from the first one that starts with "|" to the last
one (text between tables included). `python benchmarks/sync_docs_tables.py` rewrites every such block of
README.md and docs/**/*.md from its file; `--check` only lists the stale ones (exit 1), as
tests/test_docs_tables.py does.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from advface_fast.fileio import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def quoted_tables(text: str) -> str:
    """A results file's lines from its first table line to its last (text between tables included)."""
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows:
        raise ValueError("no table in it")
    return "\n".join(lines[rows[0]:rows[-1] + 1]) + "\n"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def sync(page: Path, write: bool) -> list[str]:
    """The blocks of ``page`` that differ from their files (rewritten when ``write``)."""
    text = page.read_text()
    stale = []

    def fresh(m: re.Match) -> str:
        source = REPO / m["path"]
        if not source.is_file():
            raise FileNotFoundError(f"{page.relative_to(REPO)} quotes {m['path']}, which does not exist")
        body = quoted_tables(source.read_text())
        if body != m["body"]:
            stale.append(f"{page.relative_to(REPO)}: the table from {m['path']}")
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(fresh, text)
    if write and new != text:
        write_text_atomic(page, new)
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="list stale blocks and exit 1 if any; change nothing")
    args = ap.parse_args(argv)
    stale = [s for p in pages() for s in sync(p, write=not args.check)]
    for s in stale:
        print(("stale: " if args.check else "updated: ") + s)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
