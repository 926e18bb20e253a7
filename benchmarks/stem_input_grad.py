"""The image stem of an attack step: oneDNN's input gradient vs the polyphase form, and chunking.

    python benchmarks/stem_input_grad.py --threads 2 --out benchmarks/results/stem_input_grad.json

dlib-resnet's stem is a 7x7 / 2 convolution from 3 to 32 channels on 150 x 150 chips, then a
3x3 / 2 max-pool. Two tables, every variant timed in the same interleaved rounds (median):

1. The stem convolution's input gradient alone (N x 32 x 72 x 72 -> N x 3 x 150 x 150), bf16 and
   fp32, channels_last: PyTorch's ``convolution_backward`` (oneDNN backward-data) vs the polyphase
   forward convolution (``frozen_conv.polyphase_input_grad``), each with its GFLOP/s over the
   convolution's own FLOPs (2 * N * 72 * 72 * 32 * 3 * 49).
2. The whole stem, forward + input gradient (image fp32 NCHW in, gradient fp32 out), bf16: the plain
   operations under autograd, the polyphase FrozenConv2d, and ``ChunkedStem`` at several chunk
   sizes, with a large buffer rewritten between the forward and the backward as the rest of the
   network does in a real step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, run_record, write_json  # noqa: E402

from advface_fast.allocator import keep_freed_memory
from advface_fast.models.frozen_conv import FrozenConv2d, polyphase_input_grad, polyphase_weight
from advface_fast.models.stem import ChunkedStem
from advface_fast.precision import device_features

CL = torch.channels_last


def timed_rounds(fns: dict, rounds: int, reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            for _ in range(reps):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def input_grad_table(n: int, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 3, 7, 7, generator=gen) * 0.05
    grad32 = torch.randn(n, 32, 72, 72, generator=gen)
    like = torch.empty(n, 3, 150, 150)
    gflop = 2 * n * 72 * 72 * 32 * 3 * 49 / 1e9
    fns = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        w = weight.to(dtype).contiguous(memory_format=CL)
        w_p = polyphase_weight(weight, (2, 2)).to(dtype).contiguous(memory_format=CL)
        g = grad32.to(dtype).contiguous(memory_format=CL)
        x = like.to(dtype).contiguous(memory_format=CL)
        fns[f"{name} aten convolution_backward"] = (
            lambda g=g, x=x, w=w: torch.ops.aten.convolution_backward(
                g, x, w, None, (2, 2), (0, 0), (1, 1), False, (0, 0), 1, (True, False, False)))
        fns[f"{name} polyphase"] = lambda g=g, w_p=w_p: polyphase_input_grad(g, w_p, (2, 2), (0, 0), torch.empty_like(like))
    med = timed_rounds(fns, rounds, 3)
    return [{"variant": k, "ms": round(v * 1e3, 3), "gflops": round(gflop / v, 1)} for k, v in med.items()]


class PlainStem(nn.Module):
    def __init__(self, conv, shift):
        super().__init__()
        self.conv, self.shift = conv, shift

    def forward(self, x):
        x = (x + self.shift).contiguous(memory_format=CL)
        return F.max_pool2d(self.conv(x), 3, 2)


def stem_table(n: int, rounds: int, chunks: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 32, 7, stride=2).requires_grad_(False)
    with torch.no_grad():
        conv.weight.mul_(0.3)
    shift = torch.tensor([-0.48, -0.46, -0.41]).view(1, 3, 1, 1)
    images = torch.randint(0, 256, (n, 3, 150, 150), generator=gen).float().div_(255.0)
    grad_out = torch.randn(n, 32, 35, 35, generator=gen).to(torch.bfloat16).contiguous(memory_format=CL)
    scratch = torch.empty(64 * 2**20 // 4)  # the rest of the network, touching 64 MB in between
    stems = {"plain ops (autograd)": PlainStem(conv.to(memory_format=CL), shift),
             "polyphase FrozenConv2d": PlainStem(FrozenConv2d(conv, "polyphase", memory_format=CL), shift)}
    for c in chunks:
        stems[f"ChunkedStem chunk {c}"] = ChunkedStem(conv, shift, chunk=c)

    def step(stem):
        x = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = stem(x)
        scratch.fill_(1.0)
        (g,) = torch.autograd.grad(y, x, grad_out.to(y.dtype))
        return g

    med = timed_rounds({k: (lambda s=s: step(s)) for k, s in stems.items()}, rounds, 2)
    fill = timed_rounds({"fill": lambda: scratch.fill_(1.0)}, rounds, 2)["fill"]
    base = med["plain ops (autograd)"] - fill
    return [{"variant": k, "ms": round((v - fill) * 1e3, 3), "speedup_vs_plain": round(base / (v - fill), 2)}
            for k, v in med.items()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="images (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--chunks", default="2,4,8,16,32", help="ChunkedStem chunk sizes (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()
    load_before = load_average()
    grad_rows = input_grad_table(args.batch, args.rounds)
    stem_rows = stem_table(args.batch, args.rounds, [int(c) for c in args.chunks.split(",")])
    result = {
        "what": "dlib-resnet stem (7x7/2 conv 3->32, 3x3/2 max-pool): input gradient forms and chunking",
        **run_record(argv),
        "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "statistic": "median over rounds",
        "load_average_before": load_before, "load_average_after": load_average(),
        "torch": torch.__version__, "device": device_features("cpu"), "allocator": allocator,
        "input_gradient": grad_rows,
        "stem_forward_and_input_gradient_bf16": stem_rows,
    }
    print("input gradient of the stem convolution:")
    for r in grad_rows:
        print(f"  {r['variant']:36s} {r['ms']:8.2f} ms  {r['gflops']:7.1f} GFLOP/s")
    print("stem forward + input gradient (bf16):")
    for r in stem_rows:
        print(f"  {r['variant']:36s} {r['ms']:8.2f} ms  {r['speedup_vs_plain']:5.2f}x")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
