"""The Python examples of README.md and of the docs pages (docs/**/*.md) run as written. Every ```python
block is either run by a test here (with only the data swapped for lfw_ci or a scratch store) or listed in
FRAGMENTS with the reason it cannot run alone; a new block that is neither fails
test_every_readme_python_block_is_run_or_listed.

The Python API example runs as a plain script (no `if __name__ == "__main__":` guard), in a fresh
interpreter, with a cold chip cache (so alignment really starts), on lfw_ci."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A block is named by a piece of its code (not its file or line number, which any edit above it shifts, or a
# move between README.md and a docs page changes).
API_EXAMPLE = "from advface_fast.pair_chips import prepare_pairs"
GALLERY_STORE = 'con = sqlite3.connect("gallery-store/manifest.sqlite")'
# block -> the test that runs it
RUN = {API_EXAMPLE: "test_readme_api_example_runs_as_a_plain_script",
       GALLERY_STORE: "test_readme_gallery_store_example_reads_a_real_store"}
# block -> why no test runs it
FRAGMENTS = {
    "attack = PGD(model, eps=4": "a fragment of the attacks section: model, queries, gallery_embeddings, is_same "
                                 "and thresholds are the reader's own tensors, defined nowhere in the docs",
    'create_model("facenet", weights=': "needs the FaceNet and CosFace weight files, which the package cannot "
                                        "download and no test machine has",
    'name = "example-random-shift"': "the head of tests/example_defense.py's RandomShift, which test_defense_protocol "
                                     "runs through the pipeline; test_the_defense_example_is_the_tested_one checks it "
                                     "is that file's text",
}


def test_the_defense_example_is_the_tested_one():
    block = readme_block('name = "example-random-shift"')
    assert block in (REPO / "tests" / "example_defense.py").read_text()


def doc_files() -> list[Path]:
    """README.md and every page of the docs site (docs/**/*.md), the files whose examples are checked."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def fenced_blocks(languages: str) -> list[tuple[str, str]]:
    """("FILE line N" of the opening fence, code) of every fenced block of README.md and docs/**/*.md
    whose info string matches ``languages`` (a regular expression; "" matches a bare fence)."""
    blocks = []
    for path in doc_files():
        where = path.relative_to(REPO).as_posix()
        start, keep, code = None, False, []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fence = re.match(r"```\s*(\S*)\s*$", line.strip())
            if start is None and fence:
                start, keep, code = number, re.fullmatch(languages, fence.group(1)) is not None, []
            elif start is not None and line.strip().startswith("```"):
                if keep:
                    blocks.append((f"{where} line {start}", "\n".join(code) + "\n"))
                start = None
            elif start is not None:
                code.append(line)
        assert start is None, f"{where} line {start}: a fenced block is never closed"
    return blocks


def python_blocks() -> list[tuple[str, str]]:
    """Every ```python block of README.md and docs/**/*.md."""
    return fenced_blocks(r"python3?|py")


def readme_block(name: str) -> str:
    """The one ```python block of README.md or of a docs page that contains ``name``."""
    found = [code for _, code in python_blocks() if name in code]
    assert len(found) == 1, f"{len(found)} python blocks of README.md and docs/ contain {name!r} (expected one)"
    return found[0]


def run_script(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    script = cwd / "example.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    env.pop("ADVFACE_LFW", None)
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_every_readme_python_block_is_run_or_listed():
    blocks = python_blocks()
    names = {**RUN, **FRAGMENTS}
    for where, code in blocks:
        matched = [name for name in names if name in code]
        assert len(matched) == 1, (
            f"{where}: a ```python block " + ("that no test here runs and FRAGMENTS does not list"
                                              if not matched else f"matched by several names {matched}")
            + "; run it in tests/test_readme_api.py (add it to RUN) or list it in FRAGMENTS with the reason")
    for name in names:
        assert sum(name in code for _, code in blocks) == 1, (
            f"{name!r} names no python block of README.md or docs/ (or several)")
    assert all(callable(globals().get(test)) for test in RUN.values())
    assert not set(RUN) & set(FRAGMENTS)


# shell block -> why its `advface` lines are not parsed as commands
SHELL_FRAGMENTS = {
    "advface verify   [--model M]": "the command synopsis: [options] and alternatives a|b, not one command line",
}


def advface_command_lines(code: str) -> list[list[str]]:
    """The argument lists of the `advface ...` commands of a shell block (continuation lines joined,
    comments dropped, the part after `&&` where a command is chained). A line with a `...` argument
    ("the options above") is no whole command and is left out."""
    import shlex

    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        match = re.search(r"(?:^|&&|;)\s*advface\s+(.*)$", line)
        if match and "..." not in shlex.split(match.group(1)):
            out.append(shlex.split(match.group(1)))
    return out


def test_every_advface_command_in_the_docs_parses():
    """Every `advface` command line in a shell block of README.md or docs/ is accepted by the real
    parser (a renamed option or command fails here), or its block is listed in SHELL_FRAGMENTS."""
    from advface_fast.cli import build_parser

    parser = build_parser()
    checked = 0
    for where, code in fenced_blocks(r"bash|sh|shell|console|"):
        listed = [name for name in SHELL_FRAGMENTS if name in code]
        if listed:
            continue
        for argv in advface_command_lines(code):
            try:
                parser.parse_args(argv)
            except SystemExit:
                raise AssertionError(f"{where}: `advface {' '.join(argv)}` does not parse") from None
            checked += 1
    assert checked >= 10  # the check looks at real commands (README's verify, the docs' examples)
    for name in SHELL_FRAGMENTS:
        assert any(name in code for _, code in fenced_blocks(r"bash|sh|shell|console|")), f"stale entry {name!r}"


def test_readme_api_example_runs_as_a_plain_script(lfw_ci, tmp_path):
    code = readme_block(API_EXAMPLE)
    assert "path/to/lfw" in code and "__main__" not in code
    # Only the data changes: lfw_ci for the path, and Table 1 on 4 pairs of its fold (the example's
    # 20 would attack for a minute and test nothing more).
    code = code.replace("path/to/lfw", str(lfw_ci)).replace("Table1Config(", "Table1Config(max_pairs=4, ")
    result = run_script(code, tmp_path, ADVFACE_HOME=str(tmp_path / "home"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BrokenProcessPool" not in result.stderr
    assert (tmp_path / "runs" / "verify" / "verify.json").is_file()


def test_readme_gallery_store_example_reads_a_real_store(tmp_path):
    """The store example, unchanged, in a folder holding a gallery-store made by `advface gallery`:
    one aligned chip under the id the example reads, D = one PGD step."""
    import numpy as np
    from PIL import Image

    from advface_fast.cli import main

    photos = tmp_path / "photos" / "Aaron_Eckhart"
    photos.mkdir(parents=True)
    chip = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    Image.fromarray(chip).save(photos / "Aaron_Eckhart_0001.jpg", quality=95)
    assert main(["gallery", "--input", str(tmp_path / "photos"), "--out", str(tmp_path / "gallery-store"), "--aligned",
                 "--defense-steps", "1", "--batch-size", "1", "--threads", "1", "--quiet"]) == 0
    result = run_script(readme_block(GALLERY_STORE) + "print(emb.dtype, emb.shape)\n", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["float32", "(128,)"]  # what the example's comment says
