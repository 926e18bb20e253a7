"""How many oneDNN reorders one attack step performs: weight re-packing counted, not timed.

    python benchmarks/count_reorders.py --batch 64 --out benchmarks/results/reorders_per_step_<cpu>.json

PyTorch's eager convolution hands oneDNN the frozen weights in PyTorch's layout at every call, and
oneDNN re-packs them into the blocked layout its kernel wants: a reorder per convolution per step
that a prepacked frozen copy would do once. This script runs the fast path's attack step (the
fast copy of dlib-resnet under the resolved precision, ``Attack._ascent_gradient``: forward,
similarity, input gradient) twice to warm up, then one step with oneDNN's verbose mode on
(``torch.backends.mkldnn.verbose``), and counts the executed primitives from oneDNN's own log:
convolutions (forward / backward-data) and reorders, the reorders split into weight-shaped
(4-d, kernel-sized trailing dims: the frozen weights re-packed) and the rest (activations,
layout changes). A count is a property of the code path, not of the machine's load, so it is
valid on a busy machine. The issue's target: 0 weight reorders per step after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_json  # noqa: E402

from advface_fast.attacks import PGD
from advface_fast.models import create_model
from advface_fast.models.fast import make_fast
from advface_fast.precision import device_features, resolve_precision


def weight_shaped(dims: str) -> bool:
    """A 4-d tensor whose trailing two dims are a small square kernel (1x1 .. 7x7): a conv weight."""
    parts = dims.split("x")
    return len(parts) == 4 and parts[2] == parts[3] and int(parts[2]) <= 7 and int(parts[0]) >= 8


def parse(log: str) -> dict:
    """Executed primitives in a oneDNN verbose log: counts by kind."""
    counts, reorders = Counter(), Counter()
    for line in log.splitlines():
        if not line.startswith("onednn_verbose") or ",exec," not in line:
            continue
        fields = line.split(",")
        kind = next((f for f in fields if f in ("convolution", "reorder", "matmul", "inner_product", "eltwise",
                                                  "pooling", "binary", "sum")), "other")
        prop = next((f for f in fields if f.startswith(("forward", "backward"))), "")
        counts[f"{kind} {prop}".strip()] += 1
        if kind == "reorder":
            dims = re.findall(r"\b\d+(?:x\d+){3}\b", line)
            reorders["weight-shaped" if dims and weight_shaped(dims[-1]) else "other"] += 1
    return {"primitives": dict(sorted(counts.items())), "reorders": dict(sorted(reorders.items()))}


def verbose_step(attack: PGD, x, gallery, is_same) -> str:
    """oneDNN's verbose log of one step (its C++ stdout captured through the file descriptor)."""
    for _ in range(2):
        attack._ascent_gradient(x, gallery, is_same)
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                attack._ascent_gradient(x, gallery, is_same)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return log.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    plain = create_model("dlib-resnet")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 150, 150), generator=gen).float().div_(255.0)
    with torch.no_grad():
        gallery = plain(torch.randint(0, 256, (args.batch, 3, 150, 150), generator=gen).float().div_(255.0))
    is_same = torch.arange(args.batch) % 2 == 0
    rows = {}
    for name, model, prec in (("fp32 eager (plain model)", plain, "fp32"),
                              (f"fast path ({precision})", make_fast(plain), precision)):
        attack = PGD(model, eps=4, precision=prec)
        found = parse(verbose_step(attack, x, gallery, is_same))
        rows[name] = found
        print(f"{name}: {found['reorders']} reorders; {found['primitives']}")
    record = {"command": command_line(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cpu": device_features(torch.device("cpu")), "torch": torch.__version__, "batch": args.batch,
              "threads": torch.get_num_threads(), "per_step": rows}
    if args.out:
        write_json(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
