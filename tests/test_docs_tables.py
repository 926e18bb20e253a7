"""Every table a docs page quotes from a committed results file (between `<!-- table: FILE -->` and
`<!-- /table -->`) is that file's tables as committed now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sync_docs_tables", REPO / "benchmarks" / "sync_docs_tables.py")
sync_docs_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync_docs_tables)


def test_docs_quote_the_committed_tables():
    stale = [s for p in sync_docs_tables.pages() for s in sync_docs_tables.sync(p, write=False)]
    assert not stale, "run `python benchmarks/sync_docs_tables.py`: " + "; ".join(stale)


def test_a_stale_block_is_found_and_rewritten(tmp_path, monkeypatch):
    (tmp_path / "r.md").write_text("# title\n\ntext\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nmiddle\n\n| c |\n|---|\n\nChecks:\n")
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- table: r.md -->\n| a | b |\n|---|---|\n| 1 | 3 |\n<!-- /table -->\nafter\n")
    monkeypatch.setattr(sync_docs_tables, "REPO", tmp_path)
    assert sync_docs_tables.sync(page, write=False) == ["page.md: the table from r.md"]
    assert sync_docs_tables.sync(page, write=True)
    assert page.read_text() == ("intro\n<!-- table: r.md -->\n| a | b |\n|---|---|\n| 1 | 2 |\n\nmiddle\n\n| c |\n"
                                "|---|\n<!-- /table -->\nafter\n")
    assert sync_docs_tables.sync(page, write=False) == []


def test_a_block_naming_a_missing_file_is_an_error(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("<!-- table: gone.md -->\n| x |\n<!-- /table -->\n")
    monkeypatch.setattr(sync_docs_tables, "REPO", tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.md"):
        sync_docs_tables.sync(page, write=False)
