"""Reader of dlib's binary serialization, enough to load a trained dlib DNN without dlib.

dlib writes (serialize.h, float_details.h, tensor.h, dnn/core.h, dnn/layers.h):

- an integer as one control byte (low 4 bits: number of value bytes; bit 0x80: negative)
  followed by that many little-endian bytes of the magnitude;
- a float/double as two such integers, mantissa (int64) and exponent (int16): m * 2**e;
- a string as its length (integer) then its bytes; a bool as the ASCII byte '0' or '1';
- a tensor as version 2, four dims (n, k, nr, nc), then raw little-endian float32;
- an alias_tensor (a view into a layer's params) as version 1 and four dims.

A network is written loss layer first, then the versions of every nested layer wrapper
(outermost first), then the input layer and then every computational layer bottom-up, each
followed by its wrapper's book-keeping (bools, empty cached tensors, sometimes an int).
`read_dlib_net` returns that bottom-up list of layers; turning it into a module is the job of
the model file that knows the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Names of layer-details records we understand; anything else is reported, not guessed.
KNOWN_LAYERS = ("con_4", "affine_", "relu_", "max_pool_2", "avg_pool_2", "add_prev_", "fc_2")


class DlibFormatError(ValueError):
    """The byte stream is not the dlib network we expect; the message gives the offset."""


@dataclass
class DlibLayer:
    """One computational layer: its record name, scalar settings and float32 arrays."""

    kind: str
    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


@dataclass
class DlibNet:
    loss: str
    loss_attrs: dict
    input: str
    input_attrs: dict
    layers: list  # list[DlibLayer], bottom-up (input side first)


class _Stream:
    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, msg: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {msg} at byte offset {self.pos}")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of file")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"unexpected end of file (wanted {n} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        ctrl = self.byte()
        size = ctrl & 0x0F
        if size > 8 or ctrl & 0x70:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        return float(mantissa) * 2.0**exponent

    def string(self) -> str:
        n = self.int()
        if not 0 <= n < 1 << 20:
            raise self.fail(f"implausible string length {n}")
        return self.take(n).decode("ascii", errors="replace")

    def bool(self) -> bool:
        b = self.byte()
        if b not in (0x30, 0x31):
            raise self.fail(f"expected a bool ('0'/'1'), got 0x{b:02x}")
        return b == 0x31

    def tensor(self) -> np.ndarray:
        start = self.pos
        version = self.int()
        if version != 2:
            self.pos = start
            raise self.fail(f"expected tensor version 2, got {version}")
        dims = tuple(self.int() for _ in range(4))
        count = int(np.prod(dims))
        raw = self.take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self) -> tuple:
        version = self.int()
        if version != 1:
            raise self.fail(f"expected alias_tensor version 1, got {version}")
        return tuple(self.int() for _ in range(4))

    def peek_string(self) -> str | None:
        """The string at the current position if one plausibly starts here, else None."""
        save = self.pos
        try:
            n = self.int()
            if not 1 <= n <= 64 or self.pos + n > len(self.data):
                return None
            raw = self.data[self.pos : self.pos + n]
            return raw.decode("ascii") if all(32 < c < 127 for c in raw) else None
        except (DlibFormatError, UnicodeDecodeError):
            return None
        finally:
            self.pos = save


def _read_details(s: _Stream, kind: str) -> DlibLayer:
    layer = DlibLayer(kind)
    a = layer.attrs
    if kind == "con_4":
        params = s.tensor().reshape(-1)
        a["num_filters"], a["nr"], a["nc"] = s.int(), s.int(), s.int()
        a["stride_y"], a["stride_x"] = s.int(), s.int()
        a["padding_y"], a["padding_x"] = s.int(), s.int()
        filters, biases = s.alias_tensor(), s.alias_tensor()
        for _ in range(4):  # learning-rate / weight-decay multipliers: training only
            s.float()
        n_w = int(np.prod(filters))
        if n_w + int(np.prod(biases)) != params.size:
            raise s.fail(f"con_4 params size {params.size} != filters {filters} + biases {biases}")
        layer.arrays["weight"] = params[:n_w].reshape(filters)
        layer.arrays["bias"] = params[n_w:].copy()
    elif kind == "affine_":
        params = s.tensor().reshape(-1)
        gamma, beta = s.alias_tensor(), s.alias_tensor()
        n = int(np.prod(gamma))
        if n + int(np.prod(beta)) != params.size:
            raise s.fail("affine_ params size does not match gamma + beta")
        layer.arrays["gamma"] = params[:n].copy()
        layer.arrays["beta"] = params[n:].copy()
        # Newer dlib appends the mode (0 = CONV: per channel, 1 = FC: per unit); older files omit it.
        if s.peek_string() not in KNOWN_LAYERS and not _at_trailer(s):
            a["mode"] = s.int()
    elif kind == "relu_":
        pass
    elif kind in ("max_pool_2", "avg_pool_2"):
        a["nr"], a["nc"], a["stride_y"], a["stride_x"] = s.int(), s.int(), s.int(), s.int()
        a["padding_y"], a["padding_x"] = s.int(), s.int()
    elif kind == "add_prev_":
        pass
    elif kind == "fc_2":
        a["num_outputs"], a["num_inputs"] = s.int(), s.int()
        params = s.tensor().reshape(-1)
        weights, biases = s.alias_tensor(), s.alias_tensor()
        a["bias_mode"] = s.int()
        for _ in range(4):
            s.float()
        n_w = int(np.prod(weights))
        # dlib stores the weight matrix as [num_inputs, num_outputs].
        layer.arrays["weight"] = params[:n_w].reshape(a["num_inputs"], a["num_outputs"])
        if int(np.prod(biases)):
            layer.arrays["bias"] = params[n_w:].copy()
    else:
        raise s.fail(f"unsupported layer record '{kind}'")
    return layer


def _at_trailer(s: _Stream) -> bool:
    """True if the next byte starts a wrapper trailer (a bool written as '0'/'1')."""
    return s.pos < len(s.data) and s.data[s.pos] in (0x30, 0x31)


def _skip_trailer(s: _Stream) -> None:
    """Skip an add_layer's book-keeping: bools, cached tensors (empty when saved clean), an int."""
    while _at_trailer(s):
        s.bool()
    while s.pos < len(s.data) and s.peek_string() not in KNOWN_LAYERS:
        start = s.pos
        try:
            t = s.tensor()
            if t.size:
                raise s.fail("non-empty cached tensor in a layer trailer")
            continue
        except DlibFormatError:
            s.pos = start
        s.int()  # sample_expansion_factor of the layer that wraps the input layer


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a dlib DNN file (e.g. dlib_face_recognition_resnet_model_v1.dat)."""
    path = Path(path)
    s = _Stream(path.read_bytes(), path.name)
    if s.int() not in (1, 2):
        raise s.fail("unknown add_loss_layer version")
    loss = s.string()
    loss_attrs = {}
    if loss == "loss_metric_2":
        loss_attrs["margin"] = s.float()
        loss_attrs["distance_threshold"] = s.float()
    elif loss == "loss_metric_":
        pass
    else:
        raise s.fail(f"unsupported loss layer '{loss}'")
    # Versions of the nested layer wrappers come next, one integer each, until the input layer.
    while s.peek_string() is None or not s.peek_string().startswith("input"):
        s.int()
    input_name = s.string()
    input_attrs = {}
    if input_name == "input_rgb_image_sized":
        input_attrs["mean_rgb"] = (s.float(), s.float(), s.float())
        input_attrs["nr"], input_attrs["nc"] = s.int(), s.int()
    elif input_name == "input_rgb_image":
        input_attrs["mean_rgb"] = (s.float(), s.float(), s.float())
    else:
        raise s.fail(f"unsupported input layer '{input_name}'")
    layers = []
    while s.pos < len(s.data):
        kind = s.string()
        layers.append(_read_details(s, kind))
        _skip_trailer(s)
    return DlibNet(loss, loss_attrs, input_name, input_attrs, layers)

