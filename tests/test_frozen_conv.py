"""FrozenConv2d against nn.Conv2d over shapes and input-gradient forms (aten, flipped, polyphase, dilated):
equal outputs and input gradients in fp32 (<= 1e-5), equal to autocast's bf16 convolution up to
rounding, no weight cast after the first step, gradients in the input's own dtype and layout; the
polyphase kernel against a direct construction; the fast dlib-resnet with frozen convolutions
against the fast model without them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advface_fast.models.frozen_conv import (FrozenConv2d, conv2d_input_grad_as_conv, dilated_supported, freeze_convs,
                                             polyphase_input_grad, polyphase_weight)

SHAPES = [  # (c_in, c_out, kernel, stride, padding, bias, spatial)
    (3, 8, 3, 1, 1, True, 12), (8, 8, 3, 1, 0, False, 9), (4, 6, 5, 1, 2, True, 11), (4, 6, 1, 1, 0, True, 7),
    (8, 16, 3, 2, 0, True, 13), (3, 8, 7, 2, 0, True, 21), (6, 6, (3, 1), 1, (1, 0), False, 8),
    (3, 32, 7, 2, 0, True, 150), (8, 16, 3, 2, 1, True, 14), (4, 6, 5, 3, 2, False, 17),
    (4, 6, (3, 5), (2, 3), (1, 2), True, 19), (4, 6, 2, 2, 0, True, 8),
    (4, 6, 2, 2, 0, True, 9), (3, 4, 3, 3, 0, True, 10),  # the last row / column gets no gradient
]


def modes(shape):
    stride = shape[3] if isinstance(shape[3], tuple) else (shape[3], shape[3])
    return ["aten", "polyphase", "dilated", "auto"] + (["flipped"] if stride == (1, 1) else [])  # groups 1 here


GROUPED = [  # (c_in, c_out, kernel, stride, padding, groups, spatial): depthwise and grouped, strided
    (16, 16, 3, 2, 1, 16, 14), (6, 6, 3, 2, 1, 6, 15), (8, 12, 3, 2, 1, 4, 13), (8, 8, 5, 3, 2, 8, 17),
    (4, 8, 3, 2, 0, 4, 12), (6, 6, (3, 5), (2, 3), (1, 2), 3, 19), (8, 8, 3, 1, 1, 8, 9),
]


def grads(module, x, dtype=None, g=None):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if g is None else g
    (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
    return y.float().detach(), gx.float()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_output_and_input_gradient_equal_conv2d(shape, channels_last):
    c_in, c_out, k, stride, pad, bias, hw = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias).requires_grad_(False)
    x = torch.randn(2, c_in, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    y0, g0 = grads(conv, x)
    for mode in modes(shape):
        frozen = FrozenConv2d(conv, mode)
        y1, g1 = grads(frozen, x)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max(), mode
        # the input gradient comes back in the input's own layout (autograd.grad: no re-layout by AccumulateGrad)
        x_in = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(frozen(x_in).sum(), x_in)
        assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), mode


@pytest.mark.parametrize("shape", GROUPED, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dilated_input_gradient_of_grouped_convs_equals_conv2d(shape, channels_last):
    """The zero-inserted form for depthwise / grouped convolutions: fp32 within 1e-5 of scale, bf16
    within bf16 rounding of autocast's convolution, the gradient in the input's own dtype and layout."""
    c_in, c_out, k, stride, pad, groups, hw = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, groups=groups).requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c_in, hw, hw).contiguous(memory_format=fmt)
    conv = conv.to(memory_format=fmt)
    frozen = FrozenConv2d(conv, "dilated")
    y0, g0 = grads(conv, x)
    y1, g1 = grads(frozen, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    y0b, g0b = grads(conv, x, torch.bfloat16)
    y1b, g1b = grads(frozen, x, torch.bfloat16)
    assert (y1b - y0b).abs().max() <= 2 ** -7 * y0b.abs().max()
    assert (g1b - g0).abs().max() <= 2 ** -6 * g0.abs().max() and (g0b - g0).abs().max() <= 2 ** -6 * g0.abs().max()
    x_in = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(frozen(x_in).sum(), x_in)
    assert gx.dtype == torch.float32 and gx.is_contiguous(memory_format=fmt)


def test_auto_picks_polyphase_for_strided_convs_on_few_channels_only():
    assert FrozenConv2d(nn.Conv2d(3, 32, 7, stride=2)).input_grad == "polyphase"
    assert FrozenConv2d(nn.Conv2d(32, 64, 3, stride=2)).input_grad == "aten"
    assert FrozenConv2d(nn.Conv2d(3, 32, 3, padding=1)).input_grad == "aten"
    assert FrozenConv2d(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)).input_grad == "aten"  # never dilated
    with pytest.raises(ValueError, match="dilated"):
        FrozenConv2d(nn.Conv2d(8, 8, 3, stride=2, padding=3, groups=8), "dilated")
    w = torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match="groups 1"):
        conv2d_input_grad_as_conv(torch.randn(1, 8, 6, 6), w, w, None, (2, 2), (1, 1), 8, "flipped")


def test_dilated_supported_accepts_strided_grouped_convs_only():
    assert dilated_supported((2, 2), (1, 1), (1, 1), 32, (3, 3))
    assert not dilated_supported((1, 1), (1, 1), (1, 1), 32, (3, 3))  # stride 1
    assert not dilated_supported((2, 2), (1, 1), (1, 1), 1, (3, 3))  # groups 1: oneDNN's own kernel
    assert not dilated_supported((2, 2), (1, 1), (2, 2), 32, (3, 3))  # dilation
    assert not dilated_supported((2, 2), (3, 3), (1, 1), 32, (3, 3))  # padding >= kernel
    with pytest.raises(ValueError, match="flipped"):
        FrozenConv2d(nn.Conv2d(3, 8, 3, stride=2), "flipped")
    with pytest.raises(ValueError, match="polyphase"):
        FrozenConv2d(nn.Conv2d(4, 8, 3, stride=2, groups=2), "polyphase")
    with pytest.raises(ValueError, match="input_grad"):
        FrozenConv2d(nn.Conv2d(3, 8, 3), "fastest")


def test_polyphase_weight_holds_each_phase_taps_flipped():
    """Output channel (a, b, c), tap (T-1-u, T-1-v) is W[:, c, a + s*u, b + s*v] (zero past the kernel)."""
    w = torch.randn(5, 3, 7, 7)
    wp = polyphase_weight(w, (2, 2)).view(2, 2, 3, 5, 4, 4)
    for a in range(2):
        for b in range(2):
            for u in range(4):
                for v in range(4):
                    want = w[:, :, a + 2 * u, b + 2 * v].t() if a + 2 * u < 7 and b + 2 * v < 7 else torch.zeros(3, 5)
                    assert torch.equal(wp[a, b, :, :, 3 - u, 3 - v], want)


def test_polyphase_input_grad_casts_and_keeps_the_layout():
    """bf16 gradients in, the input's fp32 dtype and channels_last layout out (padding cropped into it)."""
    torch.manual_seed(0)
    w, g = torch.randn(6, 4, 3, 3), torch.randn(2, 6, 7, 7)
    like = torch.empty(2, 4, 14, 14).contiguous(memory_format=torch.channels_last)
    want = torch.ops.aten.convolution_backward(g, like, w, None, (2, 2), (1, 1), (1, 1), False, (0, 0), 1,
                                               (True, False, False))[0]
    got = polyphase_input_grad(g.bfloat16(), polyphase_weight(w, (2, 2)).bfloat16(), (2, 2), (1, 1), like)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_polyphase_input_grad_writes_into_out():
    torch.manual_seed(0)
    w, g = torch.randn(8, 3, 7, 7), torch.randn(2, 8, 72, 72)
    want = torch.ops.aten.convolution_backward(g, torch.empty(2, 3, 150, 150), w, None, (2, 2), (0, 0), (1, 1), False,
                                               (0, 0), 1, (True, False, False))[0]
    out = torch.full((2, 3, 150, 150), float("nan"))
    got = polyphase_input_grad(g, polyphase_weight(w, (2, 2)), (2, 2), (0, 0), out)
    assert got is out and not out.isnan().any()
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
def test_bf16_equals_autocast_conv_up_to_rounding_and_casts_weights_once(shape):
    c_in, c_out, k, stride, pad, bias, hw = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias).requires_grad_(False)
    frozen = FrozenConv2d(conv)
    x = torch.randn(4, c_in, hw, hw)
    (y0, g0), (y1, g1) = grads(conv, x, torch.bfloat16), grads(frozen, x, torch.bfloat16)
    assert (y1 - y0).abs().max() <= 0.02 * y0.abs().max()
    assert F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.999
    cached = list(frozen._cache.values())
    grads(frozen, x, torch.bfloat16)
    assert len(frozen._cache) == 1 and all(a is b for a, b in zip(list(frozen._cache.values())[0], cached[0]))
    assert cached[0][0].dtype == torch.bfloat16
    # fp32 again: its own weights, not the bf16 copy
    y2, _ = grads(frozen, x)
    torch.testing.assert_close(y2, conv(x), rtol=1e-5, atol=1e-5)


def test_no_gradient_needed_uses_the_plain_convolution():
    conv = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    frozen = FrozenConv2d(conv)
    with torch.no_grad():
        torch.testing.assert_close(frozen(torch.ones(1, 3, 5, 5)), conv(torch.ones(1, 3, 5, 5)))


def test_fast_dlib_resnet_with_frozen_convs_equals_the_fast_model():
    from advface_fast.models import create_model
    from advface_fast.models.fast import make_fast

    dlib_model = create_model("dlib-resnet")
    fast = make_fast(dlib_model)
    frozen = make_fast(dlib_model, frozen_convs=True)
    assert frozen.switches["frozen_convs"] and isinstance(frozen.blocks[0].conv1, FrozenConv2d)
    x = torch.rand(3, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    g = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    (e0, g0), (e1, g1) = grads(fast, x, g=g), grads(frozen, x, g=g)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max()
    (e0, g0), (e1, g1) = grads(fast, x, torch.bfloat16, g), grads(frozen, x, torch.bfloat16, g)
    assert F.cosine_similarity(g0.flatten(), g1.flatten(), dim=0) > 0.99
    assert (e1 - e0).abs().max() <= 0.05 * e0.abs().max()


def test_freeze_convs_replaces_every_conv():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1)))
    freeze_convs(copy.deepcopy(net))
    frozen = freeze_convs(net)
    assert [type(m).__name__ for m in frozen.modules() if "Conv" in type(m).__name__] == ["FrozenConv2d"] * 2
