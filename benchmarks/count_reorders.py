"""How many oneDNN reorders one attack step performs: weight re-packing counted, not timed.

    python benchmarks/count_reorders.py --batch 64 --out benchmarks/results/reorders_per_step_<cpu>.json

PyTorch's eager convolution hands oneDNN the frozen weights in PyTorch's layout at every call, and
oneDNN re-packs them into the blocked layout its kernel wants: a reorder per convolution per step
that a prepacked frozen copy would do once. This script runs the fast path's attack step (the
fast copy of each ``--models`` model under the resolved precision, ``Attack._ascent_gradient``: forward,
similarity, input gradient) twice to warm up, then one step with oneDNN's verbose mode on
(``torch.backends.mkldnn.verbose``), and counts the executed primitives from oneDNN's own log:
convolutions (forward / backward-data) and reorders, the reorders split into weight-shaped
(kernel-sized trailing dims, 4-d or grouped 5-d: the frozen weights re-packed) and the rest
(activations, layout changes), with oneDNN's own execution times summed per kind. A count is a
property of the code path, not of the machine's load, so it is valid on a busy machine; the times
are not (take them on an idle one). The issue's target: 0 weight reorders per step after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_json  # noqa: E402

from advface_fast.attacks import PGD
from advface_fast.bench.onednn import count_primitives, onednn_log
from advface_fast.models import create_model, get_model_spec
from advface_fast.models.fast import make_fast
from advface_fast.precision import device_features, resolve_precision


def verbose_step(attack: PGD, x, gallery, is_same) -> str:
    """oneDNN's verbose log of one step after two warm-up steps."""
    for _ in range(2):
        attack._ascent_gradient(x, gallery, is_same)
    return onednn_log(lambda: attack._ascent_gradient(x, gallery, is_same))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dlib-resnet", help="comma list of models (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--packed", action="append", default=[], choices=("weights", "fused", "fused-mul"),
                   help="also count dlib-resnet's fast path with make_fast(packed=MODE); repeatable")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    rows = {}
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec = get_model_spec(model_name)
        plain = create_model(model_name)
        h, w = spec.input_size
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (args.batch, 3, h, w), generator=gen).float().div_(255.0)
        with torch.no_grad():
            gallery = plain(torch.randint(0, 256, (args.batch, 3, h, w), generator=gen).float().div_(255.0))
        is_same = torch.arange(args.batch) % 2 == 0
        dlib = model_name == "dlib-resnet"
        paths = [("fp32 eager (plain model)", plain, "fp32"),
                 (f"fast path{', unpacked' if dlib else ''} ({precision})",
                  make_fast(plain, packed="off") if dlib else spec.make_fast(plain), precision)]
        if dlib:
            paths += [(f"fast path, packed={mode} ({precision})", make_fast(plain, packed=mode), precision)
                      for mode in args.packed]
        for name, model, prec in paths:
            found = count_primitives(verbose_step(PGD(model, eps=4, precision=prec), x, gallery, is_same))
            label = name if dlib and len(args.models.split(",")) == 1 else f"{model_name}: {name}"
            rows[label] = found
            ms = found["milliseconds"]
            print(f"{label}: {found['reorders']} reorders ({ms.get('reorder', 0.0):.2f} ms of "
                  f"{sum(v for k, v in ms.items() if not k.startswith('reorder ')):.1f} ms in oneDNN); "
                  f"{found['primitives']}")
    record = {"command": command_line(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cpu": device_features(torch.device("cpu")), "torch": torch.__version__, "batch": args.batch,
              "threads": torch.get_num_threads(), "per_step": rows}
    if args.out:
        write_json(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
