"""facenet (Inception-ResNet-v1): architecture vs facenet-pytorch's own module, loading of saved
state dicts (strict, weights_only / safetensors), the missing-weights error and the fast copy."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types

import pytest
import torch

from advface_fast import create_model
from advface_fast.models import get_model_spec
from advface_fast.models.facenet import InceptionResNetV1, make_fast
from conftest import missing


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights and batch-norm statistics, so folding and loading are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("bn.weight") or name == "last_bn.weight":
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = max(t[0].numel(), 1) if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _randomise(InceptionResNetV1())


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def _reference_class():
    """facenet-pytorch's InceptionResnetV1, loaded from the installed wheel's source file without
    importing the package (its __init__ needs torchvision)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        missing("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch)")
    path = f"{list(spec.submodule_search_locations)[0]}/models/inception_resnet_v1.py"
    pkg = "_facenet_reference"
    for name in (pkg, f"{pkg}.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    download = types.ModuleType(f"{pkg}.utils.download")
    download.download_url_to_file = lambda *a, **k: pytest.fail("the reference tried to download")
    sys.modules[f"{pkg}.utils.download"] = download
    module_spec = importlib.util.spec_from_file_location(f"{pkg}.inception_resnet_v1", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.InceptionResnetV1


def test_architecture_matches_facenet_pytorch(model, images):
    need = _reference_class()
    reference = need(pretrained=None, classify=False).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)  # every name, in order
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in reference.parameters())
    # Same weights -> same embeddings (the reference takes standardised input).
    reference.load_state_dict(ours)
    with torch.no_grad():
        expected = reference((images * 255 - 127.5) / 128)
        got = model(images)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_output_shape_and_parameter_count(model, images):
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 512) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    # 23,482,624 parameters without the classifier head (facenet-pytorch's InceptionResnetV1,
    # classify=False, counted by the test above against the reference module).
    assert sum(p.numel() for p in model.parameters()) == 23_482_624
    with pytest.raises(ValueError, match="160 x 160"):
        model(torch.rand(1, 3, 112, 112))


def _checkpoint(model, head_classes: int = 8631) -> dict:
    """A state dict laid out like facenet-pytorch's published ones (with the classifier head)."""
    state = dict(model.state_dict())
    state["logits.weight"] = torch.randn(head_classes, 512)
    state["logits.bias"] = torch.zeros(head_classes)
    return state


def test_saved_and_reloaded_state_dict(model, images, tmp_path):
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(_checkpoint(model), path)
    loaded = create_model("facenet", weights=path)
    assert loaded.spec.name == "facenet" and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    # DataParallel prefix, a {"state_dict": ...} container, safetensors: the same weights.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    from safetensors.torch import save_file

    st = tmp_path / "facenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    for other in (wrapped, st):
        with torch.no_grad():
            torch.testing.assert_close(create_model("facenet", weights=other)(images), model(images), rtol=0, atol=0)


def test_bad_checkpoints_are_refused_with_the_keys_named(model, tmp_path):
    state = dict(model.state_dict())
    del state["repeat_1.0.conv2d.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["last_linear.weight"] = torch.zeros(512, 1000)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        create_model("facenet", weights=path)
    text = str(err.value)
    assert "missing (1): repeat_1.0.conv2d.weight" in text and "unexpected (1): extra.weight" in text
    assert "last_linear.weight (512, 1000) (expected (512, 1792))" in text
    # A pickle carrying an arbitrary object is never unpickled.
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": types.SimpleNamespace(a=1)}, protocol=2))
    with pytest.raises(ValueError, match="weights_only=True"):
        create_model("facenet", weights=evil)


def test_missing_weights_error_says_where_to_get_them(monkeypatch):
    monkeypatch.delenv("ADVFACE_FACENET_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        create_model("facenet")
    text = str(err.value)
    assert "\n" not in text and "weights=PATH" in text and "facenet-pytorch/releases" in text
    spec = get_model_spec("facenet")
    assert spec.alignment == {"aligner": "mtcnn", "size": 160, "template": "facenet", "margin": 14}
    assert spec.input_size == (160, 160) and spec.embedding_dim == 512


def test_fast_copy_matches_the_plain_model(model, images):
    fast = make_fast(model)
    assert fast is not model and isinstance(model.last_bn, torch.nn.BatchNorm1d)  # original untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), rtol=0, atol=1e-5)
    # Input gradients flow through the fast copy as through the plain one.
    x = images.clone().requires_grad_(True)
    fast(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(TypeError):
        make_fast(torch.nn.Linear(2, 2))
