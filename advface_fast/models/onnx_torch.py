"""An ONNX graph run as a differentiable ``torch.nn.Module``: the op set face models use.

``OnnxModule(path_or_model)`` reads the graph once, folds every node whose inputs are all
constants (``DequantizeLinear`` of int8 weights, the ``Reshape`` after it, ``Constant``, shape
arithmetic on constants) into float buffers at load time, and runs the remaining nodes with
plain torch ops in ``forward``. Gradients flow to the inputs, so attacks work on any supported
model; the constants are buffers, moved by ``.to(device)``.

The op implementations live in ``onnx_ops``. Supported ops (``SUPPORTED_OPS``): Conv,
BatchNormalization, PRelu, Relu, LeakyRelu, Sigmoid, Tanh, Clip, Softmax, Add, Sub, Mul, Div,
Pow, Sqrt, Neg, Exp, Gemm, MatMul, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Concat,
Slice, Gather, Shape, ConstantOfShape, Pad, Cast, Identity, Dropout (inference), MaxPool,
AveragePool, GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceSum, ReduceL2, Constant,
DequantizeLinear (per tensor, per axis and blocked, opset 21 ``block_size``). Any other op raises
``UnsupportedOnnxOpError`` at load time naming the first one and its node.

``fold_batchnorm(net)`` is the fast copy's rewrite: each Conv -> BatchNormalization pair becomes
one Conv (W' = W * k, b' = (b - mean) * k + beta, k = gamma / sqrt(var + eps), computed in float64).

``dequantize_onnx(model)`` is the numpy counterpart used as a reference: a copy of the graph
with every constant ``DequantizeLinear`` replaced by a float initialiser, so onnxruntime can run
the float network the torch module computes. ``prune_graph_inputs(model)`` drops graph inputs
no node reads (some converters leave them, and onnxruntime then demands a value for each).

Example::

    net = OnnxModule("face.onnx")          # N x 3 x 112 x 112 float -> N x 128
    emb = net(torch.rand(2, 3, 112, 112) * 255)
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .onnx_ops import OPS, SUPPORTED_OPS, UnsupportedOnnxOpError, _attrs, _to_torch

_ONNX_DOMAINS = ("", "ai.onnx")


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    return onnx.load(str(path))


def check_supported(model: onnx.ModelProto) -> None:
    """Raise ``UnsupportedOnnxOpError`` naming the first node whose op is not supported."""
    for i, node in enumerate(model.graph.node):
        if node.domain not in _ONNX_DOMAINS or node.op_type not in OPS:
            domain = f" (domain '{node.domain}')" if node.domain not in _ONNX_DOMAINS else ""
            raise UnsupportedOnnxOpError(
                f"ONNX op '{node.op_type}'{domain} in node '{node.name or '<unnamed>'}' (node #{i}) is not "
                f"supported by the torch port; supported ops: {', '.join(SUPPORTED_OPS)}")


class _Step:
    __slots__ = ("op", "name", "fn", "attrs", "inputs", "outputs")

    def __init__(self, node, attrs):
        self.op, self.name, self.fn, self.attrs = node.op_type, node.name, OPS[node.op_type], attrs
        self.inputs, self.outputs = list(node.input), [o for o in node.output]


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module (see the module docstring).

    Args:
        model: path to a ``.onnx`` file, or an ``onnx.ModelProto``.
    Shapes: one positional tensor per graph input (in graph order; graph inputs that no node
    reads are ignored); returns a tensor, or a tuple when the graph has several outputs.
    """

    def __init__(self, model):
        super().__init__()
        model = _load(model)
        check_supported(model)
        graph = model.graph
        consts: dict[str, torch.Tensor] = {i.name: _to_torch(numpy_helper.to_array(i)) for i in graph.initializer}
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        self.input_names = [i.name for i in graph.input if i.name not in consts and i.name in used]
        self.output_names = [o.name for o in graph.output]
        steps = []
        with torch.no_grad():
            for node in graph.node:
                attrs = _attrs(node)
                ins = [n for n in node.input if n]
                if all(n in consts for n in ins):  # fold constants at load time
                    step = _Step(node, attrs)
                    outs = self._call(step, [consts.get(n) if n else None for n in node.input])
                    for name, value in zip(step.outputs, outs):
                        if name:
                            consts[name] = value
                else:
                    steps.append(_Step(node, attrs))
        needed = {n for s in steps for n in s.inputs if n} | set(self.output_names)
        self._const_keys: dict[str, str] = {}
        for name in sorted(needed & consts.keys()):
            key = f"c{len(self._const_keys)}"
            self._const_keys[name] = key
            self.register_buffer(key, consts[name].contiguous())
        self.steps = steps
        missing = [n for n in needed if n not in consts and n not in self.input_names
                   and not any(n in s.outputs for s in steps)]
        if missing:
            raise ValueError(f"ONNX graph reads values nothing produces: {sorted(missing)[:5]}")

    @staticmethod
    def _call(step, args):
        while args and args[-1] is None:  # trailing optional inputs left empty
            args = args[:-1]
        try:
            out = step.fn(step.attrs, *args)
        except UnsupportedOnnxOpError as e:
            raise UnsupportedOnnxOpError(f"node '{step.name}' ({step.op}): {e}") from None
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            shapes = [None if t is None else tuple(t.shape) for t in args]
            raise RuntimeError(f"ONNX node '{step.name}' ({step.op}) failed on inputs of shapes {shapes}: {e}") from e
        return out if isinstance(out, tuple) else (out,)

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the ONNX graph takes {len(self.input_names)} input(s) "
                            f"{self.input_names}, got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        for name, key in self._const_keys.items():
            env[name] = getattr(self, key)
        for step in self.steps:
            outs = self._call(step, [env[n] if n else None for n in step.inputs])
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value
        result = tuple(env[n] for n in self.output_names)
        return result[0] if len(result) == 1 else result

    def const(self, name: str) -> torch.Tensor | None:
        """The constant (buffer) behind graph value ``name``, or None when it is computed."""
        return getattr(self, self._const_keys[name]) if name in self._const_keys else None

    def add_const(self, name: str, value: torch.Tensor) -> None:
        """Register ``value`` as the constant graph value ``name`` (a rewrite's new weights)."""
        key = f"c{1 + max((int(k[1:]) for k in self._const_keys.values()), default=-1)}"
        self._const_keys[name] = key
        self.register_buffer(key, value.contiguous())

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, outputs={self.output_names}, nodes={len(self.steps)}"


def fold_batchnorm(net: OnnxModule) -> OnnxModule:
    """A copy of ``net`` in which every Conv whose output only feeds an inference BatchNormalization
    (constant weights and statistics) computes both; ``net`` is not changed."""
    net = copy.deepcopy(net)
    reads = Counter(n for s in net.steps for n in s.inputs if n) + Counter(net.output_names)
    convs = {s.outputs[0]: s for s in net.steps if s.op == "Conv"}
    const = net.const
    steps = []
    for step in net.steps:
        conv = convs.get(step.inputs[0]) if step.op == "BatchNormalization" else None
        params = [const(n) for n in step.inputs[1:5]] if conv is not None else []
        weight = const(conv.inputs[1]) if conv is not None else None
        bias = const(conv.inputs[2]) if conv is not None and len(conv.inputs) > 2 and conv.inputs[2] else None
        foldable = (conv is not None and reads[step.inputs[0]] == 1 and weight is not None
                    and len(params) == 4 and all(p is not None for p in params)
                    and (bias is not None or len(conv.inputs) < 3 or not conv.inputs[2]))
        if not foldable:
            steps.append(step)
            continue
        gamma, beta, mean, var = (p.double() for p in params)
        k = gamma / torch.sqrt(var + step.attrs.get("epsilon", 1e-5))
        b = bias.double() if bias is not None else torch.zeros_like(mean)
        new_w = (weight.double() * k.view(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
        new_b = ((b - mean) * k + beta).to(weight.dtype)
        names = []
        for suffix, value in (("weight", new_w), ("bias", new_b)):
            name = f"{conv.outputs[0]}::folded_{suffix}"
            net.add_const(name, value)
            names.append(name)
        conv.inputs = [conv.inputs[0], *names]
        conv.outputs = list(step.outputs[:1])
    net.steps = steps
    used = {n for s in steps for n in s.inputs if n} | set(net.output_names)
    for name in [n for n in net._const_keys if n not in used]:  # drop the constants nothing reads now
        delattr(net, net._const_keys.pop(name))
    return net


DILATED_CONV = "Conv[dilated input gradient]"  # a rewritten step's op: no later rewrite takes it for a Conv


def dilate_strided_grouped_convs(net: OnnxModule) -> tuple[OnnxModule, int]:
    """A copy of ``net`` in which every strided grouped Conv (``onnx_ops.conv_dilated_grad_supported``)
    takes its input gradient (in bf16) as a forward convolution of the zero-inserted dL/dy
    (``frozen_conv.dilated_input_grad``): same forward, the rewritten kernel a new constant. Returns
    the copy and how many nodes it rewrote. Run it after ``fold_batchnorm`` (a rewritten step's op
    is ``DILATED_CONV``, which folding leaves alone)."""
    from .frozen_conv import dilated_weight
    from .onnx_ops import conv_dilated_grad_supported, op_conv_dilated_grad

    net = copy.deepcopy(net)
    rewritten = 0
    for step in net.steps:
        weight = net.const(step.inputs[1]) if step.op == "Conv" and len(step.inputs) > 1 else None
        if weight is None or not conv_dilated_grad_supported(step.attrs, weight):
            continue
        bias_name = step.inputs[2] if len(step.inputs) > 2 and step.inputs[2] else ""
        if bias_name and net.const(bias_name) is None:
            continue
        name = f"{step.outputs[0]}::dilated_weight"
        net.add_const(name, dilated_weight(weight, step.attrs.get("group", 1)))
        step.inputs = [step.inputs[0], step.inputs[1], bias_name, name]
        step.op, step.fn = DILATED_CONV, op_conv_dilated_grad
        rewritten += 1
    return net, rewritten


# -- numpy reference rewrites ---------------------------------------------------------------------

def _dequantize_np(x, scale, zero_point, axis, block_size):
    x = x.astype(np.float32)
    zp = np.zeros_like(scale, dtype=np.float32) if zero_point is None else zero_point.astype(np.float32)
    if scale.ndim == 0 or (scale.size == 1 and not block_size):
        return ((x - zp.reshape(())) * scale.reshape(())).astype(np.float32)
    axis %= x.ndim
    if block_size:
        idx = np.arange(x.shape[axis]) // block_size
        scale, zp = np.take(scale, idx, axis=axis), np.take(zp, idx, axis=axis)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp) * scale).astype(np.float32)


def dequantize_onnx(model) -> onnx.ModelProto:
    """A copy of ``model`` where every DequantizeLinear of constant inputs is replaced by a float32
    initialiser holding its output (computed with numpy); unused initialisers and graph inputs are
    dropped. The result runs in any onnxruntime."""
    model = onnx.ModelProto.FromString(_load(model).SerializeToString())
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(n in inits for n in node.input if n):
            a = _attrs(node)
            x, scale = inits[node.input[0]], inits[node.input[1]]
            zp = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            inits[node.output[0]] = _dequantize_np(x, scale, zp, a.get("axis", 1), a.get("block_size", 0))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items() if k in used)
    return prune_graph_inputs(model)


def prune_graph_inputs(model) -> onnx.ModelProto:
    """A copy of ``model`` without graph inputs that no node reads and without initialisers
    listed as graph inputs (old exporters list both; onnxruntime then wants a value for each)."""
    model = onnx.ModelProto.FromString(_load(model).SerializeToString())
    graph = model.graph
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    inits = {i.name for i in graph.initializer}
    keep = [i for i in graph.input if i.name in used and i.name not in inits]
    del graph.input[:]
    graph.input.extend(keep)
    return model


def graph_input_shape(model) -> list:
    """The declared shape of the first real graph input (ints, or names/None for free dims)."""
    model = _load(model)
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name not in inits:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in inp.type.tensor_type.shape.dim]
    raise ValueError("the ONNX graph has no non-constant input")


__all__ = ["DILATED_CONV", "OnnxModule", "dilate_strided_grouped_convs", "fold_batchnorm", "SUPPORTED_OPS", "UnsupportedOnnxOpError", "check_supported",
           "dequantize_onnx", "graph_input_shape", "prune_graph_inputs"]
