"""ONNX export and the onnxruntime engine: graph interface, parity with torch, caching, fallbacks."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from conftest import need_module  # in CI mode a missing library fails
import torch

from advface_fast import engine as engine_mod
from advface_fast.engine import (OrtEngine, TorchEngine, chips_to_array, chips_to_tensor, embed_chips,
                                 make_engine)
from advface_fast.models import create_model
from advface_fast.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_cache_key

onnx = need_module("onnx")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_parity_cache(monkeypatch):
    monkeypatch.setattr(engine_mod, "_PARITY", {})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_model("dlib-resnet", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def onnx_file(model, onnx_dir):
    return export_onnx(model, cache_dir=onnx_dir)


@pytest.fixture(scope="module")
def ort_engine(onnx_file):
    need_module("onnxruntime")
    return OrtEngine(onnx_file, device="cpu", num_threads=1)


def test_exported_graph_interface(onnx_file, model):
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME) == ("images", "embeddings")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp) == ["batch", 3, 150, 150] and dims(out) == ["batch", 128]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["advface.cache_key"] == onnx_cache_key("dlib-resnet", model)
    assert onnx_file.name == f"dlib-resnet-{meta['advface.cache_key']}.onnx"


def test_onnxruntime_matches_torch_on_real_chips_for_dynamic_batches(ort_engine, model, ci_chips):
    worst = 0.0
    for n in (1, 3, 8):  # one session, three batch sizes
        chips = ci_chips[:n]
        want = embed_chips(model, chips, batch_size=n)
        got = ort_engine.embed(chips, batch_size=n)
        assert got.shape == (n, 128) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-5, worst
    # Flip averaging and a batch size that leaves a remainder (8 = 3 + 3 + 2).
    want = embed_chips(model, ci_chips[:8], batch_size=8, flip=True)
    got = ort_engine.embed(ci_chips[:8], batch_size=3, flip=True)
    assert np.abs(got - want).max() <= 1e-5


def test_chips_to_array_is_bit_equal_to_chips_to_tensor():
    chips = np.arange(2 * 16 * 16 * 3).reshape(2, 16, 16, 3).astype(np.uint8)  # every value 0..255
    assert np.array_equal(chips_to_array(chips), chips_to_tensor(chips).numpy())
    with pytest.raises(ValueError, match="uint8"):
        chips_to_array(chips.astype(np.float32))


def test_export_is_cached_and_written_atomically(model, onnx_file, onnx_dir, monkeypatch):
    stamp = onnx_file.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise RuntimeError("re-exported")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert export_onnx(model, cache_dir=onnx_dir) == onnx_file  # a hit: the exporter is not called
    assert onnx_file.stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="re-exported"):
        export_onnx(model, cache_dir=onnx_dir, force=True)
    # The failed forced export left the cached file alone and no temporary file behind.
    assert sorted(os.listdir(onnx_dir)) == [onnx_file.name]
    assert onnx_file.stat().st_mtime_ns == stamp
    assert onnx_cache_key("dlib-resnet", model, opset=18) != onnx_cache_key("dlib-resnet", model, opset=17)


def test_missing_onnxruntime_gives_an_install_hint(monkeypatch, model, onnx_file, onnx_dir):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"advface-fast\[cpu\]"):
        OrtEngine(onnx_file)
    with pytest.raises(ImportError, match=r"advface-fast\[cpu\]"):
        make_engine(model, kind="onnxruntime", cache_dir=onnx_dir)
    fallback = make_engine(model, kind="auto", cache_dir=onnx_dir)
    assert isinstance(fallback, TorchEngine)
    assert fallback.selection["reason"] == "onnxruntime not installed"


def test_auto_picks_onnxruntime_when_it_matches_torch(model, onnx_dir, monkeypatch):
    need_module("onnxruntime")
    chosen = make_engine(model, kind="auto", device="cpu", num_threads=1, cache_dir=onnx_dir)
    assert isinstance(chosen, OrtEngine) and chosen.provider == "CPUExecutionProvider"
    assert chosen.describe()["engine"] == "onnxruntime"
    assert 0 <= chosen.selection["parity_max_abs"] <= 1e-5
    # The verdict is cached per exported file: a second engine does not probe again.
    monkeypatch.setattr(engine_mod, "parity_max_abs", lambda *a: pytest.fail("probed twice"))
    again = make_engine(model, kind="auto", device="cpu", num_threads=1, cache_dir=onnx_dir)
    assert again.selection["parity_max_abs"] == chosen.selection["parity_max_abs"]
    assert isinstance(make_engine(model, kind="torch"), TorchEngine)


def test_auto_falls_back_to_torch_when_parity_fails(model, onnx_dir, monkeypatch):
    need_module("onnxruntime")
    run = OrtEngine._run
    monkeypatch.setattr(OrtEngine, "_run", lambda self, x: run(self, x) + np.float32(1e-3))
    chosen = make_engine(model, kind="auto", device="cpu", num_threads=1, cache_dir=onnx_dir)
    assert isinstance(chosen, TorchEngine)
    assert chosen.selection["reason"].startswith("onnxruntime parity")
    with pytest.raises(ValueError, match="kind"):
        make_engine(model, kind="tensorrt")
