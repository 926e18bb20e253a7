"""Precision policy: which number format the attack gradients use on which hardware.

Attacks may compute their gradients in bfloat16 (``torch.autocast``) where the hardware does
bf16 arithmetic natively: on CPUs with AVX512_BF16 or AMX-BF16 instructions, on CUDA GPUs
that report bf16 support (Ampere and later). Elsewhere bf16 is emulated and slower than fp32,
so ``"auto"`` keeps fp32 there. The image being optimised, the update and the projection stay
in fp32; every number that decides a result (scores, thresholds, accuracy) is computed in fp32
by the caller.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "auto")
CPUINFO_PATH = Path("/proc/cpuinfo")
# The /proc/cpuinfo flags that matter for fp32 / bf16 speed.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _read_cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or None where there is none (macOS, Windows)."""
    try:
        return CPUINFO_PATH.read_text(errors="replace")
    except OSError:
        return None


def _cpu_model_name(cpuinfo: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def cpu_features() -> dict:
    """What this CPU offers: ``{"flags": {flag: bool | None}, "torch_capability", "processor", ...}``.

    Flags come from /proc/cpuinfo (first processor); where that file does not exist every flag
    is None (unknown), never guessed. ``torch_capability`` is the SIMD level PyTorch's own CPU
    kernels dispatch to (e.g. "AVX512").
    """
    cpuinfo = _read_cpuinfo()
    flags: dict[str, bool | None] = dict.fromkeys(CPU_FLAGS)
    model_name = None
    if cpuinfo is not None:
        # "flags" on x86; ARM kernels call the line "Features".
        line = next((ln for ln in cpuinfo.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), "")
        present = set(line.partition(":")[2].split())
        flags = {f: f in present for f in CPU_FLAGS}
        model_name = _cpu_model_name(cpuinfo)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch without the query
        capability = None
    return {
        "flags": flags,
        "flags_source": str(CPUINFO_PATH) if cpuinfo is not None else None,
        "torch_capability": capability,
        "model_name": model_name,
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "system": platform.system(),
    }


def device_features(device=None) -> dict:
    """What matters about ``device`` for speed and precision ("cpu", "cuda:0", a torch.device)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        return {"type": "cpu", "threads": torch.get_num_threads(), **cpu_features()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
                "bf16_supported": bool(torch.cuda.is_bf16_supported()), "cuda": torch.version.cuda}
    return {"type": device.type}


def native_bf16(device=None) -> bool:
    """True where bf16 matrix arithmetic is done in hardware (not emulated) on ``device``."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        flags = cpu_features()["flags"]
        return bool(flags.get("amx_bf16") or flags.get("avx512_bf16"))
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False  # unknown device types: do not claim it


def resolve_precision(precision: str, device=None) -> str:
    """"fp32", "bf16" or "auto" -> "fp32" | "bf16" for ``device``.

    "auto" picks bf16 only where it is native. An explicit "bf16" is honoured everywhere, with a
    warning where it would be emulated (slower than fp32, not faster).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if not native:
        warnings.warn(f"bf16 requested on {device or 'cpu'}, which has no native bf16 arithmetic: it will "
                      f"be emulated and is likely slower than fp32", RuntimeWarning, stacklevel=2)
    return "bf16"


def autocast(precision: str, device=None):
    """A context manager that runs the enclosed model in ``precision`` ("fp32" or "bf16") on ``device``.

    bf16 is ``torch.autocast(device_type, dtype=torch.bfloat16)``: convolutions and matrix
    products in bf16, reductions autocast keeps in fp32. fp32 is autocast explicitly DISABLED
    (not a no-op), so fp32 code nested inside a bf16 region (an fp32 defense inside a bf16
    attacker) still runs in fp32.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast takes a resolved precision, 'fp32' or 'bf16', got {precision!r}")
    device_type = torch.device(device if device is not None else "cpu").type
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=torch.bfloat16)


def model_device(model: torch.nn.Module, fallback=None) -> torch.device:
    """The device of ``model``'s first parameter (``fallback``, default CPU, when it has none)."""
    param = next(model.parameters(), None)
    if param is not None:
        return param.device
    return torch.device(fallback if fallback is not None else "cpu")


__all__ = [
    "PRECISIONS",
    "autocast",
    "cpu_features",
    "device_features",
    "model_device",
    "native_bf16",
    "resolve_precision",
]
