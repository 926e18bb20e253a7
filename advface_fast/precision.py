"""Precision policy: which number format the attack gradients use on which hardware.

Attacks may compute their gradients in bfloat16 (``torch.autocast``) where the hardware does
bf16 arithmetic natively: on CPUs with AVX512_BF16 or AMX-BF16 instructions, on CUDA GPUs
that report bf16 support (Ampere and later). Elsewhere bf16 is emulated and slower than fp32,
so ``"auto"`` keeps fp32 there. The image being optimised, the update and the projection stay
in fp32; every number that decides a result (scores, thresholds, accuracy) is computed in fp32
by the caller.

``best_attack_batch`` measures which batch size gives the most image-steps per second for a
model on this device and precision, and remembers the answer on disk.
"""

from __future__ import annotations

import json
import platform
import time
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


# ---------------------------------------------------------------------------------------------
# Batch size per device


def _model_id(model: torch.nn.Module) -> dict:
    spec = getattr(model, "spec", None)
    return {"class": type(model).__name__, "name": getattr(spec, "name", None),
            "weights": getattr(model, "dat_sha256", None)}


def _input_size(model: torch.nn.Module) -> tuple[int, int]:
    spec = getattr(model, "spec", None)
    size = getattr(spec, "input_size", None) or getattr(model, "input_size", None)
    if size is None:
        raise ValueError("the model declares no input_size (spec.input_size or model.input_size)")
    return tuple(size)


def attack_steps_per_second(model: torch.nn.Module, batch_size: int, precision: str = "fp32", device=None,
                            steps: int = 3, warmup: int = 1, seed: int = 0) -> float:
    """Image-steps per second of one attack step (forward + input gradient) at ``batch_size``;
    the median over ``steps`` timed steps after ``warmup`` untimed ones."""
    device = torch.device(device if device is not None else next(model.parameters()).device)
    h, w = _input_size(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand((batch_size, 3, h, w), generator=gen).to(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        xg = x.detach().requires_grad_(True)
        with autocast(precision, device):
            emb = model(xg)
        (grad,) = torch.autograd.grad(emb.float().square().sum(), xg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return batch_size / times[len(times) // 2]


def best_attack_batch(model: torch.nn.Module, device=None, precision: str = "fp32", candidates=(16, 32, 64), *,
                      cache_dir: str | Path | None = None, refresh: bool = False, steps: int = 3) -> int:
    """The batch size among ``candidates`` with the most attack image-steps per second.

    Measured once (a few forward + input-gradient steps per candidate) and cached as JSON under
    ``default_cache_root()/"tuning"`` (or ``cache_dir``), keyed by the device's features, the
    model, the resolved precision, the thread count and the torch version; ``refresh`` measures
    again. The measurement runs on whatever else the machine is doing: on a busy machine it is
    a rough answer.
    """
    from .cache import config_key, default_cache_root

    device = torch.device(device if device is not None else next(model.parameters()).device)
    precision = resolve_precision(precision, device)
    candidates = tuple(sorted({int(c) for c in candidates}))
    if not candidates or candidates[0] < 1:
        raise ValueError(f"candidates must be positive batch sizes, got {candidates}")
    key = config_key(device=device_features(device), model=_model_id(model), precision=precision,
                     torch=torch.__version__, candidates=candidates)
    path = Path(cache_dir if cache_dir is not None else default_cache_root() / "tuning") / f"attack-batch-{key}.json"
    if path.exists() and not refresh:
        try:
            best = int(json.loads(path.read_text())["best"])
            if best in candidates:
                return best
        except (ValueError, KeyError, TypeError):  # a damaged entry is measured again
            pass
    rates = {b: attack_steps_per_second(model, b, precision, device, steps=steps) for b in candidates}
    best = max(candidates, key=lambda b: rates[b])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"best": best, "image_steps_per_s": {str(b): r for b, r in rates.items()},
                               "precision": precision, "model": _model_id(model),
                               "device": device_features(device), "torch": torch.__version__}, indent=2) + "\n")
    tmp.replace(path)
    return best


__all__ = [
    "PRECISIONS",
    "attack_steps_per_second",
    "autocast",
    "best_attack_batch",
    "cpu_features",
    "device_features",
    "native_bf16",
    "resolve_precision",
]
