"""SFace's stride-2 depthwise convolutions: oneDNN's input gradient vs the dilated forward convolution.

    python benchmarks/strided_depthwise_grad.py --threads 2 --batch 64 \
        --out benchmarks/results/strided_depthwise_grad.json

For each of SFace's four stride-2 depthwise 3x3 layers (64 x 112 x 112 ... 512 x 14 x 14 inputs,
padding 1), channels_last, bf16 and fp32, in the same interleaved rounds (median): the forward
convolution, PyTorch's ``convolution_backward`` for the input only (oneDNN's backward-data kernel)
and ``frozen_conv.dilated_input_grad`` (the zero-inserted dL/dy through a stride-1 forward
convolution), with the dilated result's largest difference from an fp64 reference, relative to
its largest value. The allocator setting of the command-line tools is applied.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402
from stem_input_grad import timed_rounds  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.models.frozen_conv import dilated_input_grad, dilated_weight

LAYERS = ((64, 112), (128, 56), (256, 28), (512, 14))  # SFace's stride-2 depthwise inputs: C, H = W
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CL = torch.channels_last


def layer_rows(c: int, h: int, n: int, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(c)
    x64 = torch.randn(n, c, h, h, generator=gen, dtype=torch.float64)
    w64 = torch.randn(c, 1, 3, 3, generator=gen, dtype=torch.float64)
    out_h = (h + 2 - 3) // 2 + 1
    g64 = torch.randn(n, c, out_h, out_h, generator=gen, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(g64, x64, w64, None, [2, 2], [1, 1], [1, 1], False, [0, 0], c,
                                              [True, False, False])[0]
    rows = []
    for name, dtype in DTYPES.items():
        x, w, g = (t.to(dtype).contiguous(memory_format=CL) for t in (x64, w64, g64))
        w_d = dilated_weight(w, c).contiguous(memory_format=CL)
        fns = {
            "forward": lambda: F.conv2d(x, w, None, 2, 1, 1, c),
            "aten_backward": lambda: torch.ops.aten.convolution_backward(
                g, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], c, [True, False, False])[0],
            "dilated": lambda: dilated_input_grad(g, w_d, (2, 2), (1, 1), c, (h, h)),
        }
        ms = {k: round(v * 1e3, 3) for k, v in timed_rounds(fns, rounds, 1).items()}
        err = (fns["dilated"]().double() - ref).abs().max().item() / ref.abs().max().item()
        rows.append({"layer": [c, h, h], "dtype": name, "forward_ms": ms["forward"],
                     "aten_backward_ms": ms["aten_backward"], "dilated_ms": ms["dilated"],
                     "aten_over_dilated": round(ms["aten_backward"] / ms["dilated"], 2),
                     "dilated_relative_error": float(f"{err:.2e}")})
        print(rows[-1], file=sys.stderr)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="images (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    allocator = keep_freed_memory()
    torch.set_num_threads(args.threads)
    out = {"what": "stride-2 depthwise 3x3 input gradient: oneDNN backward-data vs the dilated forward convolution",
           **run_record(argv),
           "threads": args.threads, "batch": args.batch, "rounds": args.rounds, **allocator,
           "statistic": "median over interleaved rounds", "load_average_before": load_average(),
           "rows": [row for c, h in LAYERS for row in layer_rows(c, h, args.batch, args.rounds)]}
    out["load_average_after"] = load_average()
    for r in out["rows"]:
        print(f"{'x'.join(map(str, r['layer'])):>12s} {r['dtype']:4s} forward {r['forward_ms']:8.2f}  "
              f"aten backward {r['aten_backward_ms']:8.2f}  dilated {r['dilated_ms']:7.2f} ms  "
              f"({r['aten_over_dilated']}x, error {r['dilated_relative_error']})")
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
