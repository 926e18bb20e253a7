"""An ONNX graph run as a differentiable ``torch.nn.Module``: the op set face models use.

``OnnxModule(path_or_model)`` reads the graph once, folds every node whose inputs are all
constants (``DequantizeLinear`` of int8 weights, the ``Reshape`` after it, ``Constant``, shape
arithmetic on constants) into float buffers at load time, and runs the remaining nodes with
plain torch ops in ``forward``. Gradients flow to the inputs, so attacks work on any supported
model; the constants are buffers, moved by ``.to(device)``.

Supported ops (``SUPPORTED_OPS``): Conv, BatchNormalization, PRelu, Relu, LeakyRelu, Sigmoid,
Tanh, Clip, Softmax, Add, Sub, Mul, Div, Pow, Sqrt, Neg, Exp, Gemm, MatMul, Flatten, Reshape,
Transpose, Squeeze, Unsqueeze, Concat, Slice, Gather, Shape, Cast, Identity, Dropout (inference),
MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceSum, ReduceL2,
Constant, DequantizeLinear (per tensor, per axis and blocked, opset 21 ``block_size``). Any
other op raises ``UnsupportedOnnxOpError`` at load time naming the first one and its node.

``dequantize_onnx(model)`` is the numpy counterpart used as a reference: a copy of the graph
with every constant ``DequantizeLinear`` replaced by a float initialiser, so onnxruntime can run
the float network the torch module computes. ``prune_graph_inputs(model)`` drops graph inputs
no node reads (some converters leave them, and onnxruntime then demands a value for each).

Example::

    net = OnnxModule("face.onnx")          # N x 3 x 112 x 112 float -> N x 128
    emb = net(torch.rand(2, 3, 112, 112) * 255)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn


class UnsupportedOnnxOpError(NotImplementedError):
    """An ONNX node whose op the torch port does not implement."""


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        out[a.name] = value
    return out


def _to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype == np.float64:  # keep doubles: a Cast or an explicit double graph asks for them
        return torch.from_numpy(array.copy())
    return torch.from_numpy(np.ascontiguousarray(array).copy())


_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
}


# -- ops: f(attrs, *inputs) -> tensor or tuple of tensors ----------------------------------------

def _pairs(pads, n):
    """ONNX pads [b1..bn, e1..en] -> (begins, ends)."""
    pads = list(pads or [0] * (2 * n))
    return pads[:n], pads[n:]


def _auto_pads(x, kernel, strides, dilations, auto_pad):
    n = len(kernel)
    if auto_pad in ("", "NOTSET", None):
        return None
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    begins, ends = [], []
    for i in range(n):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins, ends


def _pad_spatial(x, begins, ends, value=0.0):
    """Pad the trailing spatial dims (F.pad takes the last dim first)."""
    spec = []
    for b, e in zip(reversed(begins), reversed(ends)):
        spec += [b, e]
    return F.pad(x, spec, value=value)


def op_conv(a, x, w, b=None):
    n = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    group = a.get("group", 1)
    pads = _auto_pads(x, kernel, strides, dilations, a.get("auto_pad")) or _pairs(a.get("pads"), n)
    begins, ends = pads
    if begins != ends:
        x, padding = _pad_spatial(x, begins, ends), 0
    else:
        padding = begins
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return conv(x, w.to(x.dtype), None if b is None else b.to(x.dtype), strides, padding, dilations, group)


def op_batchnorm(a, x, scale, bias, mean, var, *_):
    scale, bias, mean, var = (t.to(x.dtype) for t in (scale, bias, mean, var))
    return F.batch_norm(x, mean, var, scale, bias, training=False, momentum=0.0,
                        eps=a.get("epsilon", 1e-5))


def op_prelu(a, x, slope):
    slope = slope.to(x.dtype)
    if slope.numel() == 1:
        return F.prelu(x, slope.reshape(1))
    if (x.dim() >= 2 and slope.dim() == x.dim() - 1 and slope.shape[0] == x.shape[1]
            and all(s == 1 for s in slope.shape[1:])):
        return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)


def op_gemm(a, A, B, C=None):
    if a.get("transA", 0):
        A = A.transpose(0, 1)
    if a.get("transB", 0):
        B = B.transpose(0, 1)
    y = A @ B.to(A.dtype)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if C is not None:
        y = y + (C.to(y.dtype) if beta == 1.0 else beta * C.to(y.dtype))
    return y


def op_flatten(a, x):
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def op_reshape(a, x, shape):
    shape = [int(s) for s in shape.tolist()]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(a, axes_input, default=None):
    if axes_input is not None:
        return [int(v) for v in axes_input.tolist()]
    return a.get("axes", default)


def op_squeeze(a, x, axes=None):
    axes = _axes(a, axes)
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def op_unsqueeze(a, x, axes=None):
    axes = _axes(a, axes)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def op_slice(a, x, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset < 10: attributes
        starts, ends, axes = a["starts"], a["ends"], a.get("axes")
    else:
        starts, ends = starts.tolist(), ends.tolist()
        axes = None if axes is None else axes.tolist()
        steps = None if steps is None else steps.tolist()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise UnsupportedOnnxOpError(f"Slice with step {st} is not supported")
        dim = x.shape[ax]
        s = max(0, min(dim, s + dim if s < 0 else s))
        e = max(0, min(dim, e + dim if e < 0 else e))
        index[ax] = slice(s, e)
    return x[tuple(index)]


def op_gather(a, x, idx):
    axis = a.get("axis", 0) % x.dim()
    flat = idx.reshape(-1).long() % x.shape[axis]
    out = torch.index_select(x, axis, flat)
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def op_pool(kind):
    def run(a, x):
        kernel = list(a["kernel_shape"])
        n = len(kernel)
        strides = list(a.get("strides", [1] * n))
        dilations = list(a.get("dilations", [1] * n))
        begins, ends = (_auto_pads(x, kernel, strides, dilations, a.get("auto_pad"))
                        or _pairs(a.get("pads"), n))
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if begins != ends:
                x, begins = _pad_spatial(x, begins, ends, value=float("-inf")), [0] * n
            pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
            return pool(x, kernel, strides, begins, dilations, ceil_mode=ceil)
        include = bool(a.get("count_include_pad", 0))
        if begins != ends:
            if not include and any(begins + ends):
                raise UnsupportedOnnxOpError("AveragePool with asymmetric pads and count_include_pad=0")
            x, begins = _pad_spatial(x, begins, ends), [0] * n
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        return pool(x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include)
    return run


def op_reduce(kind):
    def run(a, x, axes=None):
        axes = _axes(a, axes)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        if kind == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=axes, keepdim=keep)
        return torch.linalg.vector_norm(x, 2, dim=axes, keepdim=keep)
    return run


def op_clip(a, x, lo=None, hi=None):
    lo = a.get("min") if lo is None else lo
    hi = a.get("max") if hi is None else hi
    return torch.clamp(x, lo, hi)


def op_constant(a):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            value = np.asarray(a[key])
            if key.startswith("value_int"):
                value = value.astype(np.int64)
            elif key.startswith("value_float"):
                value = value.astype(np.float32)
            return _to_torch(value)
    raise UnsupportedOnnxOpError(f"Constant with attributes {sorted(a)}")


def op_dequantize(a, x, scale, zero_point=None):
    """y = (x - zero_point) * scale; scale per tensor (scalar), per axis (1-D) or per block
    (same rank as x, ``block_size`` elements of x along ``axis`` share one scale)."""
    xf = x.to(torch.float32) if not x.is_floating_point() else x
    zp = None if zero_point is None else zero_point.to(torch.float32)
    if scale.dim() == 0 or scale.numel() == 1 and a.get("block_size", 0) == 0:
        y = xf - zp.reshape(()) if zp is not None else xf
        return y * scale.reshape(())
    axis = a.get("axis", 1) % x.dim()
    block = a.get("block_size", 0)
    if block:
        scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
        if zp is not None:
            zp = zp.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    else:  # per axis: 1-D along `axis`
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = None if zp is None else zp.reshape(shape)
    y = xf - zp if zp is not None else xf
    return (y * scale).to(scale.dtype)


def op_cast(a, x):
    to = a["to"]
    if to not in _ONNX_TO_TORCH_DTYPE:
        raise UnsupportedOnnxOpError(f"Cast to ONNX type {to}")
    return x.to(_ONNX_TO_TORCH_DTYPE[to])


def op_transpose(a, x):
    perm = a.get("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


def op_softmax(a, x):
    return torch.softmax(x, dim=a.get("axis", -1))


def op_leaky_relu(a, x):
    return F.leaky_relu(x, a.get("alpha", 0.01))


OPS = {
    "Conv": op_conv,
    "BatchNormalization": op_batchnorm,
    "PRelu": op_prelu,
    "Relu": lambda a, x: torch.relu(x),
    "LeakyRelu": op_leaky_relu,
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "Clip": op_clip,
    "Softmax": op_softmax,
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc"),
    "Pow": lambda a, x, y: torch.pow(x, y),
    "Sqrt": lambda a, x: torch.sqrt(x),
    "Neg": lambda a, x: -x,
    "Exp": lambda a, x: torch.exp(x),
    "Gemm": op_gemm,
    "MatMul": lambda a, x, y: torch.matmul(x, y.to(x.dtype)),
    "Flatten": op_flatten,
    "Reshape": op_reshape,
    "Transpose": op_transpose,
    "Squeeze": op_squeeze,
    "Unsqueeze": op_unsqueeze,
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Slice": op_slice,
    "Gather": op_gather,
    "Shape": lambda a, x: torch.tensor(x.shape, dtype=torch.int64),
    "Cast": op_cast,
    "Identity": lambda a, x: x,
    "Dropout": lambda a, x, *rest: x,  # inference: the identity (the mask output is not provided)
    "MaxPool": op_pool("max"),
    "AveragePool": op_pool("avg"),
    "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda a, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": op_reduce("mean"),
    "ReduceSum": op_reduce("sum"),
    "ReduceL2": op_reduce("l2"),
    "Constant": op_constant,
    "DequantizeLinear": op_dequantize,
}
SUPPORTED_OPS = tuple(sorted(OPS))
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

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, outputs={self.output_names}, nodes={len(self.steps)}"


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


__all__ = ["OnnxModule", "SUPPORTED_OPS", "UnsupportedOnnxOpError", "check_supported",
           "dequantize_onnx", "graph_input_shape", "prune_graph_inputs"]
