"""Embedding engines: aligned uint8 chips in, float32 embeddings out, batched.

The torch engine runs any registry model; faster engines (onnxruntime, bf16) plug in beside it
and must match it (parity is tested). Decision numbers (scores, thresholds, accuracy) are always
computed from float32 embeddings.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .precision import model_device


def chips_to_tensor(chips: np.ndarray, device=None) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32 in [0, 1]."""
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 uint8 chips, got {chips.dtype} {chips.shape}")
    # A copy: chips may be a read-only memory map of the chip cache.
    x = torch.from_numpy(np.array(chips, copy=True)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def embed_chips(model: torch.nn.Module, chips: np.ndarray, batch_size: int = 64, flip: bool = False,
                progress: bool | str = False, precision: str = "fp32") -> np.ndarray:
    """Embed aligned chips with ``model``; returns N x D float32.

    ``flip=True`` averages the raw embeddings of each chip and its horizontal mirror, a
    common test-time augmentation (the mean of raw embeddings serves cosine and L2 alike).
    ``precision="bf16"`` runs the model under bf16 autocast (outputs are still float32).
    """
    from .precision import autocast

    device = model_device(model)
    out = []
    desc = progress if isinstance(progress, str) else "embedding"
    for start in tqdm(range(0, len(chips), batch_size), desc=desc, unit="batch", disable=not progress):
        x = chips_to_tensor(chips[start : start + batch_size], device)
        with autocast(precision, device):
            emb = model(x).float()
            if flip:
                emb = (emb + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(emb.cpu().numpy())
    dim = getattr(model, "embedding_dim", 0)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


# ---------------------------------------------------------------------------------------------
# Engines: a common interface over torch eager and onnxruntime

ORT_MISSING = ("onnxruntime is not installed; install the extra: pip install 'advface-fast[cpu]' "
               "(CPU) or 'advface-fast[gpu]' (CUDA; never both)")
PARITY_TOLERANCE = 1e-5  # max |onnxruntime - torch| on float32 embeddings for kind="auto"

log = logging.getLogger(__name__)


def import_onnxruntime():
    """onnxruntime is optional: import it on first use, with an install hint when it is missing."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(ORT_MISSING) from err
    return onnxruntime


def chips_to_array(chips: np.ndarray) -> np.ndarray:
    """N x H x W x 3 uint8 RGB -> contiguous N x 3 x H x W float32 in [0, 1], bit-equal to
    ``chips_to_tensor`` (a float32 division by 255 either way)."""
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 uint8 chips, got {chips.dtype} {chips.shape}")
    x = np.ascontiguousarray(chips.transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(255.0)
    return x


class TorchEngine:
    """Eager PyTorch: ``embed_chips`` on the model's own device, in fp32 or under bf16 autocast."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, precision: str = "fp32"):
        self.model = model.eval()
        self.precision = precision
        self.embedding_dim = getattr(model, "embedding_dim", None)
        self.selection: dict = {"engine": self.name}

    def embed(self, chips: np.ndarray, batch_size: int = 64, flip: bool = False,
              progress: bool | str = False) -> np.ndarray:
        return embed_chips(self.model, chips, batch_size=batch_size, flip=flip, progress=progress,
                           precision=self.precision)

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(model_device(self.model)), "precision": self.precision,
                **self.selection}


class OrtEngine:
    """onnxruntime on an exported graph (see ``advface_fast.onnx_export``).

    Providers: CUDAExecutionProvider when onnxruntime offers it and ``device`` is not "cpu"
    (inputs are bound with I/O binding, outputs stay on the GPU until copied back once per batch;
    TF32 is switched off so the numbers stay float32), else CPUExecutionProvider. Graph
    optimisation is ORT_ENABLE_ALL; intra-op threads default to ``torch.get_num_threads()``.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, *, device: str | None = None, num_threads: int | None = None):
        ort = import_onnxruntime()
        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1  # one chain of convolutions: nothing to run side by side
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.num_threads = options.intra_op_num_threads

        want_cuda = device is None or str(device).startswith("cuda")
        device_id = int(str(device).split(":")[1]) if device and ":" in str(device) else 0
        providers: list = ["CPUExecutionProvider"]
        if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": "0"}))
        elif device is not None and want_cuda:
            raise RuntimeError(f"device {device!r} asked for, but onnxruntime has no CUDAExecutionProvider "
                               f"(available: {ort.get_available_providers()}); install 'advface-fast[gpu]'")
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except Exception:
            if len(providers) == 1 or not isinstance(providers[0], tuple):
                raise
            # An onnxruntime without the use_tf32 option: retry with defaults but say so.
            log.warning("CUDAExecutionProvider rejected use_tf32=0; convolutions may run in TF32")
            providers[0] = ("CUDAExecutionProvider", {"device_id": device_id})
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        # onnxruntime falls back to CPU silently when the CUDA provider fails to load: ask it.
        self.provider = self.session.get_providers()[0]
        self.device_id = device_id
        self.io_binding = self.provider == "CUDAExecutionProvider"
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        dim = self.session.get_outputs()[0].shape[-1]
        self.embedding_dim = dim if isinstance(dim, int) else None
        self.selection: dict = {"engine": self.name}

    @property
    def device(self) -> str:
        return f"cuda:{self.device_id}" if self.provider == "CUDAExecutionProvider" else "cpu"

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        # CUDA: one host-to-device copy in, the output allocated on the device, one copy out.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, x)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def embed(self, chips: np.ndarray, batch_size: int = 64, flip: bool = False,
              progress: bool | str = False) -> np.ndarray:
        """Embed aligned uint8 chips; returns N x D float32 (``flip`` as in ``embed_chips``)."""
        out = []
        desc = progress if isinstance(progress, str) else "embedding"
        for start in tqdm(range(0, len(chips), batch_size), desc=desc, unit="batch", disable=not progress):
            x = chips_to_array(chips[start : start + batch_size])
            emb = self._run(x).astype(np.float32, copy=False)
            if flip:
                emb = (emb + self._run(np.ascontiguousarray(x[..., ::-1]))) / np.float32(2)
            out.append(emb)
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim or 0), np.float32)

    def describe(self) -> dict:
        return {"engine": self.name, "provider": self.provider, "device": self.device,
                "threads": self.num_threads, "onnx": self.onnx_path.name, **self.selection}


# Parity probes of kind="auto": max |onnxruntime - torch| per (exported file, provider).
_PARITY: dict[tuple[str, str], float] = {}


def probe_chips(size: tuple[int, int], n: int = 4, seed: int = 0) -> np.ndarray:
    """Random uint8 chips (on the 1/255 grid like real ones) for the parity probe."""
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def parity_max_abs(engine: OrtEngine, model: torch.nn.Module, chips: np.ndarray) -> float:
    """Max |onnxruntime - torch| on ``chips``, the torch side run in float32 on the CPU."""
    on_cpu_fp32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    # Module.float() and .cpu() work in place: convert a copy, never the caller's model.
    reference = model if on_cpu_fp32 else copy.deepcopy(model).cpu().float()
    want = embed_chips(reference, chips, batch_size=len(chips))
    got = engine.embed(chips, batch_size=len(chips))
    return float(np.abs(got.astype(np.float64) - want).max())


def make_engine(model: str | torch.nn.Module = "dlib-resnet", kind: str = "auto", *, device=None,
                num_threads: int | None = None, opset: int | None = None, cache_dir=None,
                probe: np.ndarray | None = None, tolerance: float = PARITY_TOLERANCE,
                precision: str = "fp32", **model_kwargs) -> TorchEngine | OrtEngine:
    """An embedding engine for a registry model (name) or a built model (module).

    ``kind``: "torch", "onnxruntime" (errors if it cannot be had), or "auto": onnxruntime when it
    imports, the model exports, a provider matches ``device`` and its embeddings on a probe batch
    (``probe`` chips, default random) are within ``tolerance`` of torch's; otherwise torch. The
    choice and its reason are in ``engine.selection`` / ``engine.describe()``.
    ``device`` places the torch model; for onnxruntime None means CUDA when available, else CPU.
    ``precision`` "bf16" (or "auto" where the hardware has native bf16) gives the torch engine on
    the model's fast copy under bf16 autocast; its embeddings are close to, not equal to, fp32.
    """
    if kind not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"kind must be 'auto', 'torch' or 'onnxruntime', got {kind!r}")
    from .models import create_model
    from .onnx_export import DEFAULT_OPSET, export_onnx, input_size
    from .precision import resolve_precision

    if resolve_precision(precision, device) == "bf16":
        if kind == "onnxruntime":
            raise ValueError("the onnxruntime engine is fp32; use kind='torch' (or 'auto') with bf16")
        net = create_model(model, fast=True, **model_kwargs) if isinstance(model, str) else model
        engine = TorchEngine(net.to(device) if device is not None else net, precision="bf16")
        engine.selection = {"engine": "torch", "requested": kind, "reason": f"precision {precision} -> bf16"}
        return engine

    net = create_model(model, **model_kwargs) if isinstance(model, str) else model
    if device is not None:
        net = net.to(device)

    def torch_engine(reason: str) -> TorchEngine:
        engine = TorchEngine(net)
        engine.selection = {"engine": "torch", "requested": kind, "reason": reason}
        if kind == "auto":
            log.info("embedding engine: torch (%s)", reason)
        return engine

    if kind == "torch":
        return torch_engine("requested")
    if kind == "auto":
        try:
            import_onnxruntime()
        except ImportError:
            return torch_engine("onnxruntime not installed")

    # A torch model on the GPU with an onnxruntime on the CPU only would be a slowdown, not a gain:
    # a GPU model asks onnxruntime for CUDA (and "auto" falls back to torch without it).
    ort_device = device
    if ort_device is None and model_device(net).type != "cpu":
        ort_device = str(model_device(net))
    try:
        path = export_onnx(net, opset=opset or DEFAULT_OPSET, cache_dir=cache_dir)
        engine = OrtEngine(path, device=ort_device, num_threads=num_threads)
    except Exception as err:
        if kind == "onnxruntime":
            raise
        return torch_engine(f"onnxruntime unavailable: {type(err).__name__}: {err}")

    key = (str(path.resolve()), engine.provider)
    if key not in _PARITY:
        chips = probe if probe is not None else probe_chips(input_size(net))
        _PARITY[key] = parity_max_abs(engine, net, chips)
    max_abs = _PARITY[key]
    engine.selection = {"engine": engine.name, "requested": kind, "parity_max_abs": max_abs,
                        "parity_tolerance": tolerance}
    if kind == "auto" and not max_abs <= tolerance:  # `not <=` also catches NaN
        return torch_engine(f"onnxruntime parity {max_abs:.3g} > {tolerance:g}")
    if kind == "auto":
        log.info("embedding engine: onnxruntime/%s (parity %.3g)", engine.provider, max_abs)
    return engine
