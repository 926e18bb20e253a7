"""ChunkedStem against the plain operations (shift, strided conv, max-pool): equal outputs and input
gradients in fp32 (<= 1e-5) for every chunk size and layout, autocast's bf16 up to rounding, the
no-gradient path, and the fast dlib-resnet with the fused stem against the plain stem; the
allocator setting applied once and reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advface_fast.models.frozen_conv import FrozenConv2d
from advface_fast.models.stem import ChunkedStem


def reference(conv: nn.Conv2d, shift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(conv(x + shift), 3, 2)


def output_and_grad(fn, x, g=None, bf16=False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)) if g is None else g
    (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
    return y.float().detach(), gx, g


@pytest.fixture(scope="module")
def stem_setup():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 7, stride=2).requires_grad_(False)
    shift = torch.tensor([-0.48, -0.46, -0.41]).view(1, 3, 1, 1)
    x = torch.rand(5, 3, 45, 45, generator=torch.Generator().manual_seed(1))
    return conv, shift, x


@pytest.mark.parametrize("chunk", [1, 2, 5, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_equals_the_plain_operations(stem_setup, chunk, channels_last):
    conv, shift, x = stem_setup
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stem = ChunkedStem(conv, shift, chunk=chunk, memory_format=memory_format)
    y0, g0, g = output_and_grad(lambda t: reference(conv, shift, t), x)
    y1, g1, _ = output_and_grad(stem, x, g)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g1.dtype == torch.float32 and g1.shape == x.shape and g1.is_contiguous()
    assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    # the same in a channels_last input: the gradient comes back in the input's layout
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y2, g2, _ = output_and_grad(stem, x_cl, g)
    torch.testing.assert_close(y2, y0, rtol=1e-5, atol=1e-5)
    assert g2.is_contiguous(memory_format=torch.channels_last) and (g2 - g0).abs().max() <= 1e-5 * g0.abs().max()


def test_chunks_do_not_change_the_result(stem_setup):
    # Chunks of 1, 3 and 5 images are convolutions of other batch sizes, for which oneDNN may pick
    # other kernels (other summation orders): bitwise equal on some CPUs, elsewhere an fp32 sum may
    # round to the neighbouring bf16 value (one ulp, 2**-7 of the value at most) and so move a
    # max-pool's choice and its gradient. A chunking bug (a wrong slice, indices or output offset)
    # changes whole images: far more elements, and a gradient off by a large part of its norm.
    conv, shift, x = stem_setup
    results = [output_and_grad(ChunkedStem(conv, shift, chunk=c), x, bf16=True) for c in (1, 3, 5)]
    (y0, g0, _) = results[0]
    for y, g, _ in results[1:]:
        assert (y - y0).abs().max() <= 2 ** -7 * y0.abs().max() and (y != y0).float().mean() <= 0.01
        assert (g - g0).norm() <= 1e-2 * g0.norm()


def test_bf16_is_autocast_up_to_rounding(stem_setup):
    conv, shift, x = stem_setup
    y0, g0, g = output_and_grad(lambda t: reference(conv, shift, t), x, bf16=True)
    y1, g1, _ = output_and_grad(ChunkedStem(conv, shift, chunk=2), x, g, bf16=True)
    assert (y1 - y0).abs().max() <= 0.02 * y0.abs().max()
    assert F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.999
    assert g1.dtype == torch.float32  # the image's gradient stays fp32


def test_no_gradient_path_and_argument_checks(stem_setup):
    conv, shift, x = stem_setup
    stem = ChunkedStem(conv, shift)
    with torch.no_grad():
        torch.testing.assert_close(stem(x), reference(conv, shift, x), rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 3, 45, 45, requires_grad=True)  # an empty batch: no error, an empty gradient
    (g,) = torch.autograd.grad(stem(empty).sum(), empty, allow_unused=True)
    assert g is None or g.shape == empty.shape
    with pytest.raises(ValueError, match="strided"):
        ChunkedStem(nn.Conv2d(3, 8, 3, padding=1), shift)
    with pytest.raises(ValueError, match="chunk"):
        ChunkedStem(conv, shift, chunk=0)


def test_fast_dlib_resnet_fused_stem_equals_plain_stem(ci_chips):
    from advface_fast.models import create_model
    from advface_fast.models.fast import make_fast

    plain = create_model("dlib-resnet")
    fused, reference_fast = make_fast(plain), make_fast(plain, stem="plain")
    assert isinstance(fused.stem, ChunkedStem) and fused.switches["stem"] == "fused"
    x = torch.from_numpy(ci_chips[:5]).permute(0, 3, 1, 2).float().div(255.0)
    g = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    (e0, g0, _), (e1, g1, _) = output_and_grad(reference_fast, x, g), output_and_grad(fused, x, g)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    (e0, g0, _), (e1, g1, _) = output_and_grad(reference_fast, x, g, True), output_and_grad(fused, x, g, True)
    assert F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.99
    assert (e1 - e0).abs().max() <= 0.05 * e0.abs().max()
    with pytest.raises(ValueError, match="stem"):
        make_fast(plain, stem="fastest")
    with pytest.raises(ValueError, match="fold_affine"):
        make_fast(plain, fold_affine=False, stem="fused")


def test_frozen_convs_keep_channels_last_and_the_plain_stem():
    from advface_fast.models import create_model
    from advface_fast.models.fast import make_fast

    plain = create_model("dlib-resnet")
    # packed="off": the packed default runs its convolutions as prepacked primitives, not through the modules
    for model in (make_fast(plain, stem="plain", frozen_convs=True, packed="off"),
                  make_fast(plain, fold_affine=False, frozen_convs=True)):
        assert isinstance(model.stem_conv, FrozenConv2d) and model.stem_conv.input_grad == "aten"
        seen = []
        model.blocks[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            model(torch.rand(2, 3, 150, 150))
        assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_keep_freed_memory_is_applied_once_and_reported(monkeypatch):
    from advface_fast import allocator
    from advface_fast.environment import environment

    monkeypatch.setattr(allocator, "_state", {"keep_freed_memory": False, "why": "not requested"})
    monkeypatch.setenv("ADVFACE_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() == {"keep_freed_memory": False, "allocator": "off (ADVFACE_KEEP_FREED_MEMORY=0)"}
    monkeypatch.delenv("ADVFACE_KEEP_FREED_MEMORY")
    info = allocator.keep_freed_memory()
    import sys
    if sys.platform.startswith("linux") and info["allocator"].startswith("glibc"):
        assert info["keep_freed_memory"] is True and "mallopt heap applied" in info["allocator"]
    assert allocator.keep_freed_memory() == info  # once
    assert environment()["allocator"] == info["allocator"]


def test_keep_freed_memory_refuses_an_unknown_setting(monkeypatch):
    from advface_fast import allocator

    monkeypatch.setattr(allocator, "_state", {"keep_freed_memory": False, "why": "not requested"})
    monkeypatch.setenv("ADVFACE_KEEP_FREED_MEMORY", "huge")
    with pytest.raises(ValueError, match="ADVFACE_KEEP_FREED_MEMORY must be"):
        allocator.keep_freed_memory()


def test_weights_first_cached_under_inference_mode_still_serve_an_attack(stem_setup):
    """An embedding pass under inference_mode must not leave inference tensors that a later
    attack's backward would have to save."""
    conv, shift, x = stem_setup
    stem = ChunkedStem(conv, shift)
    frozen = FrozenConv2d(conv, "polyphase")
    with torch.inference_mode():
        stem(x), frozen(x)
    y0, g0, g = output_and_grad(lambda t: reference(conv, shift, t), x)
    _, g1, _ = output_and_grad(stem, x, g)
    assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    output_and_grad(frozen, x)


def test_cache_keys_tell_fast_paths_apart():
    """Attack rows and D's results are keyed by the fast copy's arithmetic: a new stem is a new entry;
    a model without an arithmetic record keeps its old key."""
    from advface_fast.defenses.attack_as_defense import make_defense
    from advface_fast.experiments.runner import ResizedInput
    from advface_fast.models import arithmetic_key, create_model, get_model_spec
    from advface_fast.models.fast import ARITHMETIC_VERSION, make_fast

    plain = create_model("dlib-resnet")
    fused, old = make_fast(plain), make_fast(plain, stem="plain")
    assert arithmetic_key(plain) is None
    assert arithmetic_key(fused) != arithmetic_key(old)
    assert arithmetic_key(fused) == {"version": ARITHMETIC_VERSION, **fused.switches} and fused.switches["stem"] == "fused"
    assert arithmetic_key(ResizedInput(fused, (112, 112))) == arithmetic_key(fused)
    d = make_defense(plain, "pgd", 2, (2,), spec=get_model_spec("dlib-resnet"), precision="auto")
    if d.attack_model is not plain:  # bf16 available: D attacks through the fast copy
        assert d.step_config(2)["attack_model_arithmetic"] == arithmetic_key(fused)
