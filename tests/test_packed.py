"""Prepacked oneDNN convolutions and the packed residual block against plain PyTorch.

PackedConv's forward (with each fused post-op) and input gradient (flipped, transposed, polyphase)
equal F.conv2d and autograd in fp32 over the convolution shapes of dlib-resnet, bf16 up to
rounding; the packed block and the packed fast copy equal the unpacked fast copy (fp32: summation
order; bf16: rounding) for every switch value, by output and input gradient; a changed weight is
re-packed (never a stale pack); copies drop their packs; the switch is in the arithmetic key only
when on; and one packed attack step performs no weight reorder at all (oneDNN's own log).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _tolerances import FP32_DEEP, FP32_NET, assert_close_to_scale
from advface_fast.models.frozen_conv import polyphase_input_grad
from advface_fast.models.packed_block import packed_block
from advface_fast.models.packed_conv import PackedConv, packing_supported, to_nhwc

pytestmark = pytest.mark.skipif(not packing_supported(torch.empty(1), torch.float32), reason="oneDNN not built")

CL = torch.channels_last
# (in, out, input side, stride, padding): every 3x3 convolution shape of dlib-resnet (batch 3), and odd edges
SHAPES = [(32, 32, 35, 1, 1), (32, 64, 35, 2, 0), (64, 128, 17, 2, 0), (128, 256, 8, 2, 0), (256, 256, 4, 2, 0),
          (16, 24, 9, 1, 1), (16, 24, 10, 2, 0)]


def make_conv(c_in, c_out, stride, padding, seed=0, k=3):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding).requires_grad_(False)


def inputs(c_in, side, dtype=torch.float32, seed=1, n=3):
    x = torch.randn(n, c_in, side, side, generator=torch.Generator().manual_seed(seed))
    return to_nhwc(x, dtype)


def autograd_input_grad(conv, x, g):
    x = x.detach().float().requires_grad_(True)
    (gx,) = torch.autograd.grad(conv(x), x, g.float())
    return gx


@pytest.mark.parametrize("c_in,c_out,side,stride,padding", SHAPES)
def test_fp32_forward_and_input_grad_equal_plain_torch(c_in, c_out, side, stride, padding):
    conv = make_conv(c_in, c_out, stride, padding)
    packed = PackedConv(conv)
    assert packed.input_grad_kind == ("flipped" if stride == 1 else "transposed")
    x = inputs(c_in, side)
    y = conv(x)
    assert list(y.shape) == packed.out_shape(x.shape)
    assert_close_to_scale(packed.forward(x), y, rel=FP32_NET, what="forward")
    assert_close_to_scale(packed.forward(x, "relu"), F.relu(y), rel=FP32_NET, what="bias + relu")
    other = inputs(c_out, y.shape[2], seed=2)[:, :, :, :y.shape[3]].contiguous(memory_format=CL)
    assert_close_to_scale(packed.forward(x, add=other), y + other, rel=FP32_NET, what="add")
    assert_close_to_scale(packed.forward(x, "relu", add=other), F.relu(y + other), rel=FP32_NET, what="add + relu")
    g = to_nhwc(torch.randn(y.shape, generator=torch.Generator().manual_seed(4)), torch.float32)
    gx = autograd_input_grad(conv, x, g)
    out = packed.input_grad(g, x.shape)
    assert out.shape == x.shape and out.is_contiguous(memory_format=CL)
    assert_close_to_scale(out, gx, rel=FP32_NET, what="input gradient")
    assert_close_to_scale(packed.input_grad(g, x.shape, add=x), gx + x, rel=FP32_NET, what="input gradient + add")
    assert_close_to_scale(packed.input_grad(g, x.shape, mul=x), gx * x, rel=FP32_NET, what="input gradient * mul")
    with pytest.raises(ValueError, match="one fused post-op"):
        packed.input_grad(g, x.shape, add=x, mul=x)


def test_polyphase_input_grad_of_the_stem_equals_autograd():
    conv = make_conv(3, 32, 2, 0, k=7)
    packed = PackedConv(conv, "polyphase")
    x = inputs(3, 45)
    y = conv(x)
    g = to_nhwc(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)), torch.float32)
    out = torch.empty(x.shape).contiguous(memory_format=CL)
    polyphase_input_grad(g, None, (2, 2), (0, 0), out, phases=packed.input_grad(g, x.shape))
    assert_close_to_scale(out, autograd_input_grad(conv, x, g), rel=FP32_NET)


def test_bf16_is_plain_bf16_up_to_rounding():
    conv = make_conv(64, 64, 1, 1)
    packed = PackedConv(conv)
    x = inputs(64, 17, torch.bfloat16)
    w, b = conv.weight.to(torch.bfloat16), conv.bias.to(torch.bfloat16)
    y = packed.forward(x, "relu")
    assert y.dtype == torch.bfloat16
    assert_close_to_scale(y.float(), F.relu(F.conv2d(x, w, b, 1, 1)).float(), rel=2 ** -7)
    g = to_nhwc(torch.randn(y.shape, generator=torch.Generator().manual_seed(6)), torch.bfloat16)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                              [True, False, False])[0]
    assert_close_to_scale(packed.input_grad(g, x.shape).float(), ref.float(), rel=2 ** -7)


def test_argument_checks():
    with pytest.raises(ValueError, match="flipped"):
        PackedConv(make_conv(4, 4, 2, 0), "flipped")
    with pytest.raises(ValueError, match="input_grad"):
        PackedConv(make_conv(4, 4, 1, 1), "aten")
    with pytest.raises(ValueError, match="groups"):
        PackedConv(nn.Conv2d(4, 4, 3, groups=2))


def test_a_changed_weight_is_repacked_and_copies_drop_their_packs():
    conv = make_conv(8, 8, 1, 1)
    packed = PackedConv(conv)
    x = inputs(8, 6)
    before = packed.forward(x)
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # in place: the same tensor, a new version
    assert_close_to_scale(packed.forward(x), conv(x), rel=FP32_NET)
    assert not torch.allclose(packed.forward(x), before)
    conv.load_state_dict({"weight": torch.ones_like(conv.weight), "bias": torch.zeros_like(conv.bias)})
    assert_close_to_scale(packed.forward(x), conv(x), rel=FP32_NET)
    for _ in range(5):  # new storage under the same Parameter, version unchanged: the freed address may come back
        conv.weight.data = torch.randn_like(conv.weight)
        conv.weight.data = torch.randn_like(conv.weight)
        assert_close_to_scale(packed.forward(x), conv(x), rel=FP32_NET, what="param.data replaced")
    assert len(packed._packs) == 1  # the earlier weights' packs of this shape are dropped
    clone = copy.deepcopy(packed)
    assert clone._packs == {} and clone.conv is not conv
    assert pickle.loads(pickle.dumps(packed))._packs == {}
    assert_close_to_scale(clone.forward(x), conv(x), rel=FP32_NET)


# ---------------------------------------------------------------------------------- the block


def plain_block(x, conv1, conv2, downsample):
    """dlib's block on the folded convolutions: relu(conv2(relu(conv1(x))) + zero-padded shortcut)."""
    from advface_fast.models.dlib_resnet import add_zero_padded

    y = conv2(F.relu(conv1(x)))
    shortcut = F.avg_pool2d(x, 2, 2) if downsample else x
    return F.relu(add_zero_padded(y, shortcut))


# (in, out, side, downsample): same shape; downsampling with equal sides; with a larger shortcut (3 vs 4, 1 vs 2)
BLOCKS = [(32, 32, 35, False), (32, 64, 35, True), (128, 256, 8, True), (256, 256, 4, True), (16, 16, 5, False)]


@pytest.mark.parametrize("c_in,c_out,side,downsample", BLOCKS)
@pytest.mark.parametrize("fuse,relu_backward", [(False, "threshold"), (True, "threshold"), (True, "mul")])
def test_packed_block_equals_the_plain_block(c_in, c_out, side, downsample, fuse, relu_backward):
    stride, padding = (2, 0) if downsample else (1, 1)
    conv1, conv2 = make_conv(c_in, c_out, stride, padding, seed=1), make_conv(c_out, c_out, 1, 1, seed=2)
    x = F.relu(inputs(c_in, side))
    x0 = x.clone().requires_grad_(True)
    y0 = plain_block(x0, conv1, conv2, downsample)
    g = torch.randn(y0.shape, generator=torch.Generator().manual_seed(7))
    (gx0,) = torch.autograd.grad(y0, x0, g)
    x1 = x.clone().requires_grad_(True)
    y1 = packed_block(x1, PackedConv(conv1), PackedConv(conv2), downsample, fuse=fuse, relu_backward=relu_backward)
    (gx1,) = torch.autograd.grad(y1, x1, g)
    assert y1.shape == y0.shape and gx1.shape == x.shape
    assert_close_to_scale(y1, y0, rel=FP32_NET, what="output")
    assert_close_to_scale(gx1, gx0, rel=FP32_NET, what="input gradient")


def test_packed_block_checks_its_arguments():
    from advface_fast.models.packed_block import check_block

    conv = make_conv(4, 4, 1, 1)
    with pytest.raises(ValueError, match="relu_backward"):
        packed_block(inputs(4, 5), PackedConv(conv), PackedConv(conv), False, relu_backward="exact")
    check_block(PackedConv(make_conv(4, 8, 2, 0)), PackedConv(make_conv(8, 8, 1, 1)), True)  # dlib's shapes
    for c1, c2, down in (((16, 8, 2, 0), (8, 8, 1, 1), True), ((4, 8, 1, 1), (8, 8, 1, 1), False),
                         ((4, 8, 2, 0), (8, 4, 1, 1), True)):  # a shortcut wider than the output, a bad conv2
        with pytest.raises(ValueError, match="not a dlib residual block"):
            check_block(PackedConv(make_conv(*c1)), PackedConv(make_conv(*c2)), down)


# ------------------------------------------------------------------------- the fast copy


@pytest.fixture(scope="module")
def dlib():
    from advface_fast.models import create_model

    return create_model("dlib-resnet")


def embedding_and_grad(model, x, bf16=False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        e = model(x)
    (g,) = torch.autograd.grad(e.float().pow(2).sum(), x)
    return e.float().detach(), g


@pytest.mark.parametrize("mode", ["weights", "fused", "fused-mul"])
def test_packed_fast_copy_equals_the_unpacked_one(dlib, mode):
    from advface_fast.models.fast import make_fast

    # 10 images: more than one stem chunk (8), the second one partial
    x = torch.rand(10, 3, 150, 150, generator=torch.Generator().manual_seed(8))
    off, packed = make_fast(dlib, packed="off"), make_fast(dlib, packed=mode)
    e0, g0 = embedding_and_grad(off, x)
    e1, g1 = embedding_and_grad(packed, x)
    assert_close_to_scale(e1, e0, rel=FP32_DEEP, what="fp32 embedding")
    assert_close_to_scale(g1, g0, rel=FP32_DEEP, what="fp32 input gradient")
    b0, h0 = embedding_and_grad(off, x, bf16=True)
    b1, h1 = embedding_and_grad(packed, x, bf16=True)
    assert_close_to_scale(b1, e0, rel=0.05, what="bf16 embedding vs fp32")
    # bf16 input gradients of a 29-layer net: as close to fp32 as the unpacked bf16 path's are
    assert (h1 - g0).norm() <= 1.25 * (h0 - g0).norm() + 1e-3 * g0.norm()
    with torch.no_grad():  # the no-gradient paths too
        assert_close_to_scale(packed(x), e0, rel=FP32_DEEP, what="no-grad embedding")
    fresh = make_fast(dlib, packed=mode)
    with torch.inference_mode():  # its packs first built here: used by the gradient path after
        assert_close_to_scale(fresh(x), e0, rel=FP32_DEEP, what="inference-mode embedding")
    assert_close_to_scale(embedding_and_grad(fresh, x)[1], g0, rel=FP32_DEEP, what="gradient after inference mode")
    xg = x[:2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(packed(xg).sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError):  # no double backward through the primitives (none silently wrong)
        g.sum().backward()


def test_switch_in_the_arithmetic_key_only_when_on(dlib):
    from advface_fast.models import arithmetic_key
    from advface_fast.models.fast import make_fast

    off, on = make_fast(dlib, packed="off"), make_fast(dlib, packed="fused")
    assert make_fast(dlib).switches["packed"] == "fused"  # the default
    assert "packed" not in arithmetic_key(off)
    assert arithmetic_key(on) == {**arithmetic_key(off), "packed": "fused"}
    assert arithmetic_key(make_fast(dlib, packed="weights")) != arithmetic_key(on)
    with pytest.raises(ValueError, match="packed must be one of"):
        make_fast(dlib, packed="yes")
    with pytest.raises(ValueError, match="fold_affine"):
        make_fast(dlib, fold_affine=False, packed="fused")
    clone = copy.deepcopy(on)  # a copy works and packs anew for its own convolutions
    for block, original in zip(clone.blocks, on.blocks):
        assert block.packed_convs[0].conv is block.conv1 and block.packed_convs[1].conv is block.conv2
        assert block.conv1 is not original.conv1 and block.packed_convs[0]._packs == {}
    x = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert_close_to_scale(clone(x), on(x), rel=FP32_NET)


def test_a_packed_attack_step_reorders_no_weight(dlib):
    from advface_fast.attacks import PGD
    from advface_fast.bench.onednn import count_primitives, onednn_log
    from advface_fast.models.fast import make_fast

    x = torch.rand(4, 3, 150, 150, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        gallery = dlib(torch.rand(4, 3, 150, 150, generator=torch.Generator().manual_seed(11)))
    is_same = torch.tensor([True, False, True, False])
    counts = {}
    for mode in ("off", "fused"):
        attack = PGD(make_fast(dlib, packed=mode), eps=4, precision="fp32")
        for _ in range(2):  # warm-up: the packs are built here
            attack._ascent_gradient(x, gallery, is_same)
        counts[mode] = count_primitives(onednn_log(lambda: attack._ascent_gradient(x, gallery, is_same)))
    # the count can fail: the unpacked step re-packs its convolution weights at every call
    assert counts["off"]["reorders"].get("weight-shaped", 0) > 0, counts["off"]
    assert counts["fused"]["reorders"].get("weight-shaped", 0) == 0, counts["fused"]
    assert sum(n for k, n in counts["fused"]["primitives"].items() if "convolution" in k) >= 29 * 2
