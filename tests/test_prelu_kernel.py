"""The fused PReLU backward: every path vs the plain-torch reference and vs ATen's own autograd,
bitwise (fp32 and bf16, NCHW and channels_last, negative slopes, zeros and NaNs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advface_fast.kernels.prelu import (prelu, prelu_backward, prelu_backward_fused, prelu_backward_reference,
                                        resolve_impl)

from _interpreter import run_interpreted


def _inputs(shape=(3, 5, 7, 6), dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[::7] = 0.0  # exact zeros take the slope branch
    x.view(-1)[3] = -0.0
    x.view(-1)[5] = float("nan")
    grad = torch.randn(shape, generator=g)
    a = torch.rand(shape[1], generator=g) * 0.8 - 0.2  # some negative slopes
    x, grad, a = x.to(dtype), grad.to(dtype), a.to(dtype)
    if channels_last:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    return grad, x, a


def test_reference_on_hand_computed_values():
    x = torch.tensor([[[2.0], [-1.0]], [[0.0], [-3.0]]])  # N=2, C=2, L=1
    grad = torch.tensor([[[5.0], [5.0]], [[5.0], [5.0]]])
    a = torch.tensor([0.5, -0.25])
    expected = torch.tensor([[[5.0], [-1.25]], [[2.5], [-1.25]]])
    assert torch.equal(prelu_backward_reference(grad, x, a), expected)


def _aten_input_grad(grad, x, a):
    xr = x.detach().clone().requires_grad_(True)
    F.prelu(xr, a).backward(grad)
    return xr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_matches_reference_and_aten_bitwise(dtype, channels_last):
    grad, x, a = _inputs(dtype=dtype, channels_last=channels_last)
    ref = prelu_backward_reference(grad, x, a)
    fused = prelu_backward_fused(grad, x, a)
    assert fused.dtype == ref.dtype and torch.equal(fused, ref)
    assert torch.equal(_aten_input_grad(grad, x, a), ref)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_two_pass_path_is_bitwise_for_slopes_of_any_size(channels_last):
    """The bf16 "fused" path (leaky_relu_backward + lerp) for slopes beyond lerp's 0.5 switch
    (SFace's run from -0.81 to 1.12), gradients spanning many binades, exact zeros and NaNs in x."""
    for seed in range(5):
        grad, x, _ = _inputs((2, 64, 9, 9), torch.bfloat16, channels_last, seed)
        grad = grad * torch.exp(torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed)) * 8).to(grad.dtype)
        a = (torch.rand(64, generator=torch.Generator().manual_seed(seed)) * 3 - 1.5).to(torch.bfloat16)
        got, ref = prelu_backward_fused(grad, x, a), prelu_backward_reference(grad, x, a)
        nonzero = ref != 0  # +-0 may differ in sign only (module docstring)
        assert torch.equal(got, ref) and torch.equal(got[nonzero].view(torch.int16), ref[nonzero].view(torch.int16))


def test_bf16_two_pass_path_documented_corners():
    """Signed zeros and infinite gradients: as the module docstring states, and nothing else."""
    x = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0]).bfloat16().view(1, 5)
    grad = torch.tensor([-0.0, 0.0, float("inf"), float("inf"), 3.0]).bfloat16().view(1, 5)
    a = torch.tensor([0.5, -0.5, 0.5, 0.5, 0.5]).bfloat16()
    got, ref = prelu_backward_fused(grad, x, a), prelu_backward_reference(grad, x, a)
    assert torch.equal(got[:, :2], ref[:, :2]) and not got[0, 1].signbit() and ref[0, 1].signbit()
    assert got[:, 2:4].isnan().all() and ref[:, 2:4].isinf().all() and torch.equal(got[:, 4:], ref[:, 4:])


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 9), (2, 1, 4, 4)])
def test_other_ranks_and_a_single_slope(shape):
    grad, x, _ = _inputs(shape)
    for a in (torch.tensor([0.3]), torch.rand(shape[1])):
        assert torch.equal(prelu_backward_fused(grad, x, a), prelu_backward_reference(grad, x, a))
        assert torch.equal(prelu_backward_reference(grad, x, a), _aten_input_grad(grad, x, a))


def test_prelu_autograd_gives_aten_gradients_and_falls_back_for_trainable_slopes():
    grad, x, a = _inputs(channels_last=True)
    xr = x.clone().requires_grad_(True)
    y = prelu(xr, a)
    torch.testing.assert_close(y, F.prelu(x, a), rtol=0, atol=0, equal_nan=True)  # NaN where x is NaN, as ATen
    y.backward(grad)
    assert torch.equal(xr.grad, _aten_input_grad(grad, x, a))
    # Trainable slopes: ATen's PReLU (both gradients), not the fused function.
    a_train = a.clone().requires_grad_(True)
    y = prelu(x.clone().requires_grad_(True), a_train)
    assert y.grad_fn is not None and "Prelu" in type(y.grad_fn).__name__
    y.backward(grad)
    assert a_train.grad is not None
    # No gradient wanted: plain forward, no graph.
    with torch.no_grad():
        assert prelu(xr, a).grad_fn is None


def test_impl_choice_and_errors():
    assert resolve_impl("cpu") == "fused"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cpu", "fast")
    grad, x, a = _inputs()
    with pytest.raises(ValueError, match="slope must hold 1 or C=5"):
        prelu_backward(grad, x, torch.ones(4))
    assert torch.equal(prelu_backward(grad, x, a, "reference"), prelu_backward(grad, x, a))


def test_triton_kernel_in_the_interpreter():
    """The Triton kernel, run by Triton's CPU interpreter in a fresh process (TRITON_INTERPRET=1
    must be set before triton is imported)."""
    code = (
        "from advface_fast.kernels.prelu import prelu_backward_triton, prelu_backward_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for cl in (False, True):\n"
        "    for shape in ((2, 5, 7, 6), (3, 4)):\n"
        "        x = torch.randn(shape, generator=g); x.view(-1)[::5] = 0; x.view(-1)[2] = float('nan')\n"
        "        grad = torch.randn(shape, generator=g); a = torch.rand(shape[1], generator=g) - 0.3\n"
        "        if cl and x.dim() == 4:\n"
        "            x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))\n"
        "        out = prelu_backward_triton(grad, x, a)\n"
        "        assert torch.equal(out, prelu_backward_reference(grad, x, a)), (cl, shape)\n"
        "print('ok')\n")
    run_interpreted(code, "prelu.py")


@pytest.mark.parametrize("name", ["sface", "cosface-sphere20"])
def test_model_input_gradients_equal_atens(name, monkeypatch):
    """A whole attack gradient through the model: the fused PReLU backward changes nothing."""
    import importlib

    # The module, not the function: kernels/__init__ re-exports `prelu`, which shadows the submodule.
    kp = importlib.import_module("advface_fast.kernels.prelu")
    from advface_fast.models import get_model_spec

    if name == "sface":
        from advface_fast.models import create_model

        try:
            net = create_model("sface")
        except (ModuleNotFoundError, FileNotFoundError) as err:
            from conftest import missing

            missing(str(err))
    else:
        from advface_fast.models.sphereface import SphereFace20

        torch.manual_seed(0)
        net = SphereFace20().eval().requires_grad_(False)
    x = torch.rand(2, 3, *get_model_spec(name).input_size, generator=torch.Generator().manual_seed(3))

    def input_grad():
        xr = x.clone().requires_grad_(True)
        net(xr).square().sum().backward()
        return xr.grad

    fused = input_grad()
    monkeypatch.setattr(kp, "prelu", lambda x, a, impl="auto": F.prelu(x, a))
    aten = input_grad()
    assert torch.equal(fused, aten)
