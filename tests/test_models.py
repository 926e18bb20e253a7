"""dlib-resnet: the .dat parser, the PyTorch port against dlib itself, gradients, the registry."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import need_module  # in CI mode a missing library fails
import torch

from advface_fast.models import create_model, get_model_spec, list_models
from advface_fast.models.assets import model_file
from advface_fast.models.dlib_format import DlibFormatError, read_dlib_net
from advface_fast.models.dlib_resnet import DAT_NAME, add_zero_padded, load_dlib_resnet

dlib = need_module("dlib")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_model("dlib-resnet", cache_dir=tmp_path_factory.mktemp("models"))


def to_tensor(chips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(255.0)


def test_parser_reads_the_whole_network():
    net = read_dlib_net(model_file(DAT_NAME))
    kinds = [layer.kind for layer in net.layers]
    assert net.loss == "loss_metric_2"
    assert net.loss_attrs["distance_threshold"] == pytest.approx(0.6)
    assert net.loss_attrs["margin"] == pytest.approx(0.04)
    assert net.input_attrs["nr"] == net.input_attrs["nc"] == 150
    assert np.allclose(net.input_attrs["mean_rgb"], (122.782, 117.001, 104.298), atol=1e-3)
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"con_4": 29, "affine_": 29, "relu_": 29, "max_pool_2": 1,
                      "avg_pool_2": 5, "add_prev_": 14, "fc_2": 1}
    assert net.layers[-1].arrays["weight"].shape == (256, 128)


def test_parser_rejects_a_truncated_file(tmp_path):
    data = model_file(DAT_NAME).read_bytes()
    bad = tmp_path / "truncated.dat"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibFormatError, match="offset"):
        read_dlib_net(bad)


def test_port_matches_dlib_within_1e5(model, ci_chips):
    facerec = dlib.face_recognition_model_v1(str(model_file(DAT_NAME)))
    reference = np.array([np.array(facerec.compute_face_descriptor(c)) for c in ci_chips])
    with torch.no_grad():
        ours = model(to_tensor(ci_chips)).double().numpy()
    assert ours.shape == (len(ci_chips), 128)
    assert np.abs(ours - reference).max() <= 1e-5


def test_input_gradients_exist_and_are_finite(model, ci_chips):
    x = to_tensor(ci_chips[:4]).requires_grad_(True)
    emb = model(x)
    emb.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # parameters stay frozen


def test_weight_cache_is_keyed_by_dat_hash(tmp_path, ci_chips):
    first = load_dlib_resnet(cache_dir=tmp_path)
    files = list(tmp_path.glob("dlib-resnet-*.safetensors"))
    assert len(files) == 1 and files[0].name[len("dlib-resnet-"):].startswith(first.dat_sha256[:16])
    files[0].write_bytes(b"not a safetensors file")  # a damaged cache is rebuilt, not trusted
    second = load_dlib_resnet(cache_dir=tmp_path)
    x = to_tensor(ci_chips[:2])
    with torch.no_grad():
        assert torch.equal(first.eval()(x), second.eval()(x))


def test_zero_padded_add_matches_dlib_semantics():
    a = torch.ones(1, 4, 3, 3)
    b = torch.full((1, 2, 4, 4), 2.0)
    out = add_zero_padded(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, 0, 0, 0] == 3 and out[0, 3, 0, 0] == 1  # both / only the block
    assert out[0, 0, 3, 3] == 2 and out[0, 3, 3, 3] == 0  # only the shortcut / neither


def test_registry():
    assert "dlib-resnet" in list_models()
    spec = get_model_spec("dlib-resnet")
    assert spec.input_size == (150, 150) and spec.embedding_dim == 128
    with pytest.raises(KeyError, match="available"):
        get_model_spec("no-such-model")
