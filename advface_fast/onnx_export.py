"""ONNX export of registry models, cached on disk.

The exported graph takes the model's own input: ``images``, float32 N x 3 x H x W RGB in [0, 1]
(the model's preprocessing is part of the graph), and returns ``embeddings``, N x D. Only the
batch axis is dynamic; H and W are fixed to the model's chip size.

Exporter: the TorchScript-based one (``dynamo=False``). The torch.export-based exporter needs
``onnxscript``, which is not a dependency; the TorchScript exporter records dlib-resnet's
zero-padded residual adds with pad sizes computed from C/H/W only, so the graph is correct for
any batch size (the tests check batch sizes 1, 3 and 8 against torch).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .cache import config_key, default_cache_root
from .fileio import atomic_write
from .models.identity import weights_id

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
EXPORTER = "torchscript"
_KEY_PROP = "advface.cache_key"  # ONNX metadata entry holding the file's cache key


def _resolve(model: str | nn.Module, model_kwargs: dict) -> tuple[str, nn.Module]:
    if isinstance(model, str):
        from .models import create_model

        return model, create_model(model, **model_kwargs)
    spec = getattr(model, "spec", None)
    return (spec.name if spec is not None else type(model).__name__), model


def onnx_cache_key(model_name: str, model: nn.Module, opset: int = DEFAULT_OPSET) -> str:
    return _key(model_name, weights_id(model), opset)


def _key(model_name: str, weights: str, opset: int) -> str:
    return config_key(model=model_name, weights=weights, opset=int(opset),
                      torch=torch.__version__, exporter=EXPORTER)


def onnx_cache_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_root() / "onnx"


def input_size(model: nn.Module) -> tuple[int, int]:
    spec = getattr(model, "spec", None)
    size = spec.input_size if spec is not None else getattr(model, "input_size", None)
    if size is None:
        raise ValueError("cannot tell the model's input size: give it a registry spec or an `input_size`")
    return int(size[0]), int(size[1])


def _stored_key(path: Path) -> str | None:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable: treat as absent and export again
        return None
    return next((p.value for p in proto.metadata_props if p.key == _KEY_PROP), None)


def _constants_second(graph) -> int:
    """Put the constant operand of Add/Mul second (both commute, broadcasting included).

    The exporter writes dlib's affine ``beta + x * gamma`` as Add(beta, ...); onnxruntime fuses
    an Add into the preceding Conv (and then into its NCHWc kernels) only when the constant comes
    second, which is worth about 10% on CPU.
    """
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    swapped = 0
    for node in graph.node:
        if node.op_type in ("Add", "Mul") and len(node.input) == 2 \
                and node.input[0] in constants and node.input[1] not in constants:
            node.input[0], node.input[1] = node.input[1], node.input[0]
            swapped += 1
    return swapped


def _check_io(proto, size: tuple[int, int], dim: int | None) -> None:
    """The graph's interface: named I/O, symbolic batch, everything else static."""
    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    (inp,), (out,) = proto.graph.input, proto.graph.output
    if inp.name != INPUT_NAME or out.name != OUTPUT_NAME:
        raise RuntimeError(f"exported graph has I/O {inp.name!r} -> {out.name!r}")
    in_dims, out_dims = dims(inp), dims(out)
    if not isinstance(in_dims[0], str) or in_dims[1:] != [3, *size]:
        raise RuntimeError(f"exported input has shape {in_dims}, expected [batch, 3, {size[0]}, {size[1]}]")
    if not isinstance(out_dims[0], str) or len(out_dims) != 2 or (dim and out_dims[1] != dim):
        raise RuntimeError(f"exported output has shape {out_dims}, expected [batch, {dim}]")


def export_onnx(model: str | nn.Module, path: str | Path | None = None, opset: int = DEFAULT_OPSET, *,
                cache_dir: str | Path | None = None, force: bool = False, **model_kwargs) -> Path:
    """Export ``model`` (a registry name or a module) to one ONNX file and return its path.

    With ``path=None`` the file goes to ``<cache root>/onnx/<model>-<key>.onnx``, the key covering
    model name, weights, opset and torch version. An existing file whose stored key matches is
    reused (pass ``force=True`` to export anyway). The file is written atomically and passes
    ``onnx.checker`` (full check, with shape inference).
    """
    import onnx

    name, module = _resolve(model, model_kwargs)
    weights = weights_id(module)
    key = _key(name, weights, opset)
    if path is None:
        path = onnx_cache_dir(cache_dir) / f"{name}-{key}.onnx"
    path = Path(path)
    if not force and path.exists() and _stored_key(path) == key:
        return path

    # Export a float32 CPU copy in eval mode: the cache key does not cover dtype or device.
    needs_copy = any(p.device.type != "cpu" or p.dtype != torch.float32 for p in module.parameters())
    net = (copy.deepcopy(module).cpu().float() if needs_copy else module).eval()
    size = input_size(module)
    # Batch 2, not 1: a size-1 batch could let the tracer treat the batch axis as broadcastable.
    dummy = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))

    with atomic_write(path) as tmp:
        with warnings.catch_warnings():
            # Shape comparisons in the model are traced as constants; that is right here because
            # only the batch axis varies and no shape test involves it.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, opset_version=int(opset),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        proto = onnx.load(str(tmp))
        _constants_second(proto.graph)
        _check_io(proto, size, getattr(module, "embedding_dim", None))
        meta = {_KEY_PROP: key, "advface.model": name, "advface.weights": weights,
                "advface.torch": torch.__version__, "advface.exporter": EXPORTER}
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return path


__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "export_onnx", "input_size", "onnx_cache_dir",
           "onnx_cache_key", "weights_id"]
