"""The allocator setting does what it says: with "heap" freed 100 MB blocks are reused without page
faults, with glibc's default (and with "threshold", whose ceiling is 32 MiB) every block is faulted
in again; and the price the module docstring states: with "heap", small allocations that outlive
the big blocks made before them make the heap grow by a block each time. Counted with getrusage in
fresh processes (the setting is process-wide), not timed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys
import torch
from advface_fast.allocator import keep_freed_memory
info = keep_freed_memory()
keep_small = sys.argv[1] == "keep"
faults, small = [], []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(25 * 1024 * 1024)  # 100 MB, touched
    t.fill_(1.0)
    s = torch.empty(256)  # a small allocation made while the big one lives
    if keep_small:
        small.append(s)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"info": info, "faults": faults}))
"""


def run_child(setting: str, small: str = "drop") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, small], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "ADVFACE_KEEP_FREED_MEMORY": setting})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_heap_setting_reuses_large_blocks_without_page_faults_and_its_price():
    heap = run_child("heap")
    if not heap["info"]["keep_freed_memory"]:
        pytest.skip(f"not glibc: {heap['info']['allocator']}")
    pages = 100 * 1024 * 1024 // 4096
    assert heap["faults"][0] > pages // 2  # the first touch faults the block in
    assert max(heap["faults"][-6:]) < pages // 20, heap  # then blocks are reused: (almost) no faults
    for setting in ("0", "threshold"):  # above 32 MiB both hand the block back and fault it in again
        other = run_child(setting)
        assert min(other["faults"][-6:]) > pages // 2, (setting, other)
    grows = run_child("heap", "keep")  # the stated price: the heap grows by a block per round
    assert min(grows["faults"][-6:]) > pages // 2, grows
