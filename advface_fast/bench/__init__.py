"""Side-by-side speed benchmarks: the logic behind ``advface bench`` and ``benchmarks/run_all.py``.

Every comparison runs ours and its baseline in ONE process on the same inputs, interleaved round by
round (the order rotates), after warm-up; the reported time is the median of the rounds. One file
per comparison:

  kernels.py    fused attack-update kernels vs the eager chains they replace
  pgd.py        one PGD step and PGD-k on real LFW pairs (or synthetic ones): ours fp32, ours fast path
                (bf16 + fast model), torchattacks.PGD fp32 (peer.py) on the same weights and objective;
                both success rates judged with one fixed cosine threshold on the delivered uint8 images
  embedding.py  onnxruntime and the fast bf16 torch path vs torch eager fp32, with parity
  flops.py      one attack step (forward + input gradient + update): effective GFLOP/s vs GEMM rates
  table1.py     (opt-in, long) end-to-end Table 1 on one fold: fp32 eager vs fast path vs fast + early stop
  gpu.py        Triton update bandwidth vs copy bandwidth; bf16 + CUDA graph step vs fp32 eager (CUDA only)

and harness.py (timing, rows), context.py (config, models, pairs), report.py (run, JSON, table),
cli.py (the options and the command). Every attack step runs through ``advface_fast.attacks``.
"""

from .cli import add_arguments, add_subparser, cmd_bench, config_from_args, main, report_path
from .context import (DEFAULT_SECTIONS, MODEL_NAME, SECTIONS, BenchConfig, BenchContext, PairBatch, pgd_one_step,
                      synthetic_chips)
from .embedding import TARGET_ORT, embedding_variants
from .flops import TARGET_FLOP_FRACTION, count_fwd_bwd_flops, fwd_bwd_variants, gemm_variants
from .harness import BenchRow, Timing, Variant, host_id, pending, time_side_by_side, time_variants
from .kernels import TARGET_PGD_KERNEL, kernel_variants, torch_adam_step
from .peer import TwoLogitVerifier, deliver_torchattacks, torchattacks_pgd, torchattacks_version
from .pgd import STRETCH_PGD_BF16, TARGET_PGD_BF16, pgd_variants, success_rate
from .report import SECTION_FUNCS, format_table, run_benchmarks, versions
from .table1 import TARGET_TABLE1, section_table1, table1_variants

__all__ = [
    "BenchConfig", "BenchContext", "BenchRow", "PairBatch", "Timing", "Variant", "TwoLogitVerifier",
    "SECTIONS", "DEFAULT_SECTIONS", "MODEL_NAME", "SECTION_FUNCS",
    "TARGET_PGD_KERNEL", "TARGET_PGD_BF16", "STRETCH_PGD_BF16", "TARGET_ORT", "TARGET_FLOP_FRACTION", "TARGET_TABLE1",
    "time_side_by_side", "time_variants", "pending", "host_id", "pgd_one_step", "synthetic_chips",
    "kernel_variants", "torch_adam_step", "pgd_variants", "success_rate", "embedding_variants", "fwd_bwd_variants",
    "gemm_variants", "count_fwd_bwd_flops", "section_table1", "table1_variants",
    "torchattacks_pgd", "deliver_torchattacks", "torchattacks_version",
    "run_benchmarks", "format_table", "versions", "add_arguments", "add_subparser", "config_from_args",
    "cmd_bench", "main", "report_path",
]
