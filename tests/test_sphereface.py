"""cosface-sphere20 (SphereFace-20 network): architecture, loading of saved state dicts (strict,
weights_only / safetensors), the 112x96 crop of the ArcFace chip and the fast copy."""

from __future__ import annotations

import pytest
import torch

from advface_fast import create_model
from advface_fast.models import get_model_spec
from advface_fast.models.sphereface import SphereFace20, make_fast
from _tolerances import FP32_DEEP, assert_close_to_scale


def expected_keys() -> list[str]:
    """The parameter names of CosFace_pytorch's sphere20 (net.py), written out from its layout:
    per stage a conv (weight, bias) and a PReLU, then 1/2/4/1 blocks, then fc."""
    keys = []
    for stage, blocks in zip(range(1, 5), (1, 2, 4, 1)):
        keys += [f"layer{stage}.0.weight", f"layer{stage}.0.bias", f"layer{stage}.1.weight"]
        for b in range(2, 2 + blocks):
            keys += [f"layer{stage}.{b}.{n}.weight" for n in ("conv1", "prelu1", "conv2", "prelu2")]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SphereFace20().eval()
    with torch.no_grad():
        for p in m.parameters():  # PReLU slopes away from 0.25, so a mixed-up slope shows
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))


def test_architecture(model, images):
    assert list(model.state_dict()) == expected_keys()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layer1.0.weight"] == (64, 3, 3, 3) and shapes["layer4.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["fc.weight"] == (512, 512 * 7 * 6)
    # 20 layers: 4 stage convs + 2 x 8 block convs = 20 convs (the "20" of sphere20), fc on top.
    convs = [k for k in expected_keys() if k.endswith("weight") and len(shapes[k]) == 4]
    assert len(convs) == 20
    # Counted by hand: stage convs 1,550,976 + block convs 10,100,736 + PReLU slopes 4,672 + fc 11,010,560.
    assert sum(p.numel() for p in model.parameters()) == 22_666_944
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 512)
    with pytest.raises(ValueError, match="112 x 112"):
        model(torch.rand(1, 3, 112, 96))


def test_uses_only_the_central_112x96_of_the_chip(model, images):
    changed = images.clone()
    changed[:, :, :, :8] = torch.rand_like(changed[:, :, :, :8])
    changed[:, :, :, 104:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(changed), model(images), rtol=0, atol=0)
        inner = images.clone()
        inner[:, :, 50, 50] += 0.5
        assert (model(inner) - model(images)).abs().max() > 1e-4
    x = images.clone().requires_grad_(True)
    model(x).sum().backward()
    assert (x.grad[..., :8] == 0).all() and (x.grad[..., 104:] == 0).all() and x.grad[..., 8:104].abs().sum() > 0


def test_saved_and_reloaded_state_dict(model, images, tmp_path):
    path = tmp_path / "CosFace_30_checkpoint.pth"
    torch.save(model.state_dict(), path)
    loaded = create_model("cosface-sphere20", weights=path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    from safetensors.torch import save_file

    st = tmp_path / "sphere20.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    with torch.no_grad():
        torch.testing.assert_close(create_model("cosface-sphere20", weights=st)(images), model(images), rtol=0, atol=0)
    # A sphere64 or a mis-sized checkpoint is refused with the keys named.
    state = dict(model.state_dict())
    state["layer1.3.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    state["fc.weight"] = torch.zeros(512, 512 * 7 * 7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"unexpected \(1\): layer1.3.conv1.weight.*fc.weight \(512, 25088\)"):
        create_model("cosface-sphere20", weights=tmp_path / "bad.pth")


def test_missing_weights_error_and_spec(monkeypatch):
    monkeypatch.delenv("ADVFACE_COSFACE_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match=r"weights=PATH\) or set ADVFACE_COSFACE_WEIGHTS=PATH.*CosFace_pytorch"):
        create_model("cosface-sphere20")
    spec = get_model_spec("cosface-sphere20")
    assert spec.alignment["aligner"] == "mtcnn" and spec.alignment["template"] == "arcface"
    assert spec.input_size == (112, 112) and spec.embedding_dim == 512


def test_fast_copy_matches_the_plain_model(model, images):
    fast = make_fast(model)
    assert fast.memory_format == torch.channels_last and model.memory_format == torch.contiguous_format
    with torch.no_grad():
        # outputs up to ~4 (unnormalised): folding and channels_last move float32 rounding, relative to that
        assert_close_to_scale(fast(images), model(images), FP32_DEEP)
