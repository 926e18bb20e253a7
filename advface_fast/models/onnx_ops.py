"""The ONNX ops the torch port runs: one plain-torch function per op, ``f(attrs, *inputs)``.

Every function is differentiable in its float inputs (integer inputs are shapes, indices or
quantised weights). ``OPS`` maps ONNX op names to them; ``onnx_torch.OnnxModule`` runs a graph
with it. Semantics follow the ONNX operator specification (opset 21); attribute defaults as there.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


class UnsupportedOnnxOpError(NotImplementedError):
    """An ONNX node whose op (or op variant) the torch port does not implement."""

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
    # np.array (not np.ascontiguousarray, which turns a 0-d array into 1-d) copies and keeps the rank.
    return torch.from_numpy(np.array(array, copy=True, order="C"))


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


def conv_dilated_grad_supported(a: dict, w: torch.Tensor | None) -> bool:
    """Whether a Conv node (attributes ``a``, constant weight ``w``) can take the dilated input
    gradient (``op_conv_dilated_grad``): 2-D, strided, grouped, dilation 1, explicit symmetric pads
    below the kernel size (``frozen_conv.dilated_supported``)."""
    from .frozen_conv import dilated_supported

    if w is None or w.dim() != 4 or a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return False
    begins, ends = _pairs(a.get("pads"), 2)
    return begins == ends and dilated_supported(a.get("strides", [1, 1]), begins, a.get("dilations", [1, 1]),
                                                a.get("group", 1), tuple(a.get("kernel_shape", w.shape[2:])))


def op_conv_dilated_grad(a, x, w, b, w_dilated):
    """Conv whose input gradient is a forward convolution of the zero-inserted dL/dy
    (``frozen_conv.dilated_input_grad``; ``w_dilated`` = ``dilated_weight(w, group)``): the fast
    copy's rewrite of the nodes ``conv_dilated_grad_supported`` accepts. Runs in autocast's dtype;
    in fp32 it is plain ``op_conv`` (there oneDNN's own backward was the faster one: SFace's fp32
    step 8% slower with the rewrite, its bf16 step 1.7x faster; benchmarks/results/model_attack_step_dilated.json)."""
    from .frozen_conv import compute_dtype, conv2d_input_grad_as_conv, memory_format_of

    dtype = compute_dtype(x)
    if not (torch.is_grad_enabled() and x.requires_grad) or dtype in (torch.float32, torch.float64):
        return op_conv(a, x, w, b)
    padding = _pairs(a.get("pads"), 2)[0]
    with torch.autocast(x.device.type, enabled=False):
        return conv2d_input_grad_as_conv(x, w.to(dtype), w_dilated.to(dtype), None if b is None else b.to(dtype),
                                         tuple(a.get("strides")), tuple(padding), a.get("group", 1), "dilated",
                                         memory_format_of(x))


def op_batchnorm(a, x, scale, bias, mean, var, *_):
    scale, bias, mean, var = (t.to(x.dtype) for t in (scale, bias, mean, var))
    return F.batch_norm(x, mean, var, scale, bias, training=False, momentum=0.0,
                        eps=a.get("epsilon", 1e-5))


def op_prelu(a, x, slope):
    # kernels.prelu: F.prelu forward, and a backward that computes only the input gradient when the
    # slopes are frozen (ATen's also computes the slope gradient, ~28% of SFace's attack step on CPU).
    from advface_fast.kernels.prelu import prelu

    slope = slope.to(x.dtype)
    if slope.numel() == 1:
        return prelu(x, slope.reshape(1))
    if (x.dim() >= 2 and slope.dim() == x.dim() - 1 and slope.shape[0] == x.shape[1]
            and all(s == 1 for s in slope.shape[1:])):
        return prelu(x, slope.reshape(-1))
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
    if axis == 0:
        return x.reshape(1, -1)
    # flatten() rather than reshape(prod(shape[:axis]), -1): a traced export keeps the batch dynamic
    y = x.flatten(axis) if axis < x.dim() else x.unsqueeze(-1)
    return y.flatten(0, axis - 1)


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
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax, dim = ax % x.dim(), x.shape[ax]
        s, e = (s + dim if s < 0 else s), (e + dim if e < 0 else e)
        if st > 0:
            s, e = max(0, min(dim, s)), max(0, min(dim, e))
            x = x.narrow(ax, s, max(e - s, 0)) if st == 1 else x.index_select(ax, torch.arange(s, e, st, device=x.device))
        elif st < 0:
            s, e = max(0, min(dim - 1, s)), max(-1, min(dim - 1, e))
            x = x.index_select(ax, torch.arange(s, e, st, device=x.device))
        else:
            raise UnsupportedOnnxOpError("Slice with step 0")
    return x


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


def op_constant_of_shape(a, shape):
    value = a.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return torch.full([int(v) for v in shape.tolist()], value[0].item(), dtype=_to_torch(value).dtype,
                      device=shape.device)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def op_pad(a, x, pads=None, value=None, axes=None):
    """ONNX Pad: ``pads`` = [begin of each axis..., end of each axis...] (negative = crop)."""
    mode = a.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise UnsupportedOnnxOpError(f"Pad mode {mode!r}")
    pads = [int(v) for v in (a["pads"] if pads is None else pads.tolist())]
    axes = list(range(x.dim())) if axes is None else [int(v) % x.dim() for v in axes.tolist()]
    n = len(axes)
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, ax in enumerate(axes):
        begins[ax], ends[ax] = pads[i], pads[n + i]
    spec = []
    for b, e in zip(reversed(begins), reversed(ends)):
        spec += [b, e]
    if mode == "constant":
        fill = a.get("value", 0.0) if value is None else value.reshape(()).item()
        return F.pad(x, spec, value=float(fill))
    used = [i for i in range(x.dim()) if begins[i] or ends[i]]
    if not 3 <= x.dim() <= 5 or (used and used[0] < 2) or any(v < 0 for v in begins + ends):
        raise UnsupportedOnnxOpError(f"Pad mode {mode!r} on axes {used} of a {x.dim()}-d tensor "
                                     "(only the spatial axes of N x C x ... tensors) or with negative pads")
    return F.pad(x, spec[:2 * (x.dim() - 2)], mode=_PAD_MODES[mode])


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
    "ConstantOfShape": op_constant_of_shape,
    "Pad": op_pad,
    "DequantizeLinear": op_dequantize,
}
SUPPORTED_OPS = tuple(sorted(OPS))


__all__ = ["OPS", "SUPPORTED_OPS", "UnsupportedOnnxOpError"]
