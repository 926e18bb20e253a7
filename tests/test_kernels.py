"""Tests of the fused attack-update kernels (advface_fast.kernels).

The Triton kernels run on CPU only under the Triton interpreter, which must be enabled before triton is
first imported. Other test modules may import triton earlier in this process, so the interpreter tests
are defined only when TRITON_INTERPRET=1 and run through `test_triton_subprocess_suite`, which starts a
fresh pytest process with the variable set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from advface_fast.kernels import (
    cw_step,
    linf_bounds,
    pgd_step,
    pgd_step_torchattacks,
    pgd_step_triton,
    resolve_impl,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
REPO_ROOT = Path(__file__).resolve().parents[1]

EPS = 8 / 255
ALPHA = 2 / 255
# Odd sizes around the 1024-element block, and two 3x150x150 images plus a ragged tail.
SIZES = [1, 7, 1023, 1025, 3 * 150 * 150 * 2 + 5]


def make_case(shape, seed: int, special_grads: bool = True):
    """x0 with saturated pixels, x scattered around (and beyond) its eps-ball, grad with 0, -0, inf, NaN."""
    gen = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    x0 = torch.rand(shape, generator=gen)
    flat0 = x0.view(-1)
    flat0[::11] = 0.0
    flat0[5::11] = 1.0
    lo, hi = linf_bounds(x0, EPS)
    noise = (torch.rand(shape, generator=gen) * 2 - 1) * (2 * EPS)
    x = torch.clamp(x0 + noise, 0, 1)
    grad = torch.randn(shape, generator=gen)
    if special_grads:
        g = grad.view(-1)
        g[::7] = 0.0
        g[1::13] = -0.0
        g[2::17] = float("inf")
        g[3::19] = float("-inf")
        g[4::5] = float("nan")
    return x, x0, grad, lo, hi


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; NaN payloads and signed zeros included."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def same_bits_any_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality except that any NaN matches any NaN: ATen's own NaN bit pattern differs between its
    vectorized loop (all ones) and its scalar tail (the input NaN), so NaN payloads are not comparable."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and same_bits(a[~nan_a], b[~nan_b])


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Within rtol of each value, or of the tensor's scale for values near zero; NaNs must coincide."""
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=rtol * scale)


def run_cw(impl: str, x, grad_seq, lo, hi, lr=0.01, beta1=0.9, beta2=0.999):
    x = x.clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for t, g in enumerate(grad_seq, start=1):
        out = cw_step(x, g, m, v, t, lr, lo, hi, beta1=beta1, beta2=beta2, impl=impl)
        assert out is x
    return x, m, v


def grad_sequence(shape, seed: int, steps: int = 4, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return [torch.randn(shape, generator=gen) * scale for _ in range(steps)]


# ------------------------------------------------------------------------------------------------------------
# PGD
# ------------------------------------------------------------------------------------------------------------
def test_pgd_reference_on_hand_computed_values():
    x0 = torch.tensor([0.5, 0.5, 0.5, 0.02, 0.99])
    lo, hi = linf_bounds(x0, 0.05)  # [0.45, .., 0, 0.94], [0.55, .., 0.07, 1]
    x = torch.tensor([0.5, 0.5, 0.5, 0.02, 0.99])
    grad = torch.tensor([3.0, -0.5, 0.0, -2.0, 1.0])
    out = pgd_step(x, grad, lo, hi, 0.1, impl="reference")
    assert out is x
    expected = torch.stack([hi[0], lo[1], x0[2], torch.tensor(0.0), torch.tensor(1.0)])
    assert same_bits(out, expected)


@pytest.mark.parametrize("n", SIZES)
def test_pgd_fused_matches_reference_bitwise(n):
    x, _, grad, lo, hi = make_case(n, seed=n)
    ref = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference")
    fused_in = x.clone()
    fused = pgd_step(fused_in, grad, lo, hi, ALPHA, impl="fused")
    assert fused is fused_in
    assert same_bits(fused, ref)
    # overwrite_grad: the same update, the sign written over the gradient (NaN -> 0 as in torch.sign)
    scratch = grad.clone()
    assert same_bits(pgd_step(x.clone(), scratch, lo, hi, ALPHA, impl="fused", overwrite_grad=True), ref)
    assert same_bits(scratch, torch.sign(grad))
    assert same_bits(pgd_step(x.clone(), grad.clone(), lo, hi, ALPHA, impl="reference", overwrite_grad=True), ref)


def test_pgd_auto_on_cpu_is_fused_and_matches():
    x, _, grad, lo, hi = make_case((4, 3, 10, 10), seed=1)
    assert resolve_impl(x.device, "auto") == "fused"
    assert same_bits(pgd_step(x.clone(), grad, lo, hi, ALPHA), pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference"))


def test_pgd_nan_gradient_gives_zero_step():
    # The kernels copy ATen's sign, in which NaN -> 0; if torch ever changes that, the kernel must follow.
    assert torch.sign(torch.tensor([float("nan")] * 20)).eq(0).all()
    x, _, grad, lo, hi = make_case(1000, seed=3)
    nan = torch.isnan(grad)
    assert nan.any()
    for impl in ("reference", "fused"):
        out = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl=impl)
        assert not torch.isnan(out).any()
        assert same_bits(out[nan], torch.clamp(x, lo, hi)[nan])


def test_pgd_nan_in_x_stays_nan():
    x, _, grad, lo, hi = make_case(257, seed=4, special_grads=False)
    x[10] = float("nan")
    ref = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference")
    fused = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="fused")
    assert torch.isnan(ref[10]) and same_bits(fused, ref)


def test_pgd_stays_in_ball_and_box():
    x, x0, grad, lo, hi = make_case((2, 3, 17, 19), seed=5, special_grads=False)
    for _ in range(5):
        pgd_step(x, grad, lo, hi, ALPHA, impl="fused")
        grad = torch.randn_like(grad)
    assert (x >= 0).all() and (x <= 1).all()
    assert ((x - x0).abs() <= EPS + 1e-6).all()


def test_pgd_matches_torchattacks_chain_within_one_ulp_of_x0():
    # clamp(x0 + clamp(x' - x0, -e, e), 0, 1) rounds x' - x0 and x0 + delta at x0's scale, so it can differ
    # from clamp(x', lo, hi) by one ulp of x0 (in a fraction of a percent of the pixels).
    for seed in range(3):
        x, x0, grad, lo, hi = make_case((4, 3, 50, 50), seed=seed, special_grads=False)
        ours = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="fused")
        theirs = pgd_step_torchattacks(x, x0, grad, ALPHA, EPS)
        ulp_x0 = torch.nextafter(x0, torch.full_like(x0, 2.0)) - x0
        assert ((ours - theirs).abs() <= ulp_x0).all()
        assert (ours != theirs).float().mean() < 0.01


def test_pgd_per_sample_alpha():
    x, _, grad, lo, hi = make_case((3, 3, 8, 9), seed=6)
    alphas = torch.tensor([1 / 255, 2 / 255, 0.0])
    ref = pgd_step(x.clone(), grad, lo, hi, alphas, impl="reference")
    fused = pgd_step(x.clone(), grad, lo, hi, alphas, impl="fused")
    assert same_bits(fused, ref)
    for i, a in enumerate(alphas.tolist()):
        one = pgd_step(x[i : i + 1].clone(), grad[i : i + 1], lo[i : i + 1], hi[i : i + 1], a, impl="reference")
        assert same_bits(ref[i : i + 1], one)
    # A one-element tensor acts as a float.
    single = pgd_step(x.clone(), grad, lo, hi, torch.tensor([ALPHA]), impl="fused")
    assert same_bits(single, pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference"))


def test_pgd_clears_leaf_requires_grad_inplace_guard():
    x, _, grad, lo, hi = make_case(64, seed=7)
    leaf = x.clone().requires_grad_(True)  # updates are optimizer-like: they run under no_grad
    pgd_step(leaf, grad, lo, hi, ALPHA, impl="fused")
    assert same_bits(leaf.detach(), pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference"))


# ------------------------------------------------------------------------------------------------------------
# C&W (Adam)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta1, beta2, lr", [(0.9, 0.999, 0.01), (0.3, 0.99, 0.05)])  # 0.3: lerp's other branch
def test_cw_reference_equals_torch_adam_plus_clamp(beta1, beta2, lr):
    x, _, _, lo, hi = make_case((2, 3, 31, 29), seed=8, special_grads=False)
    grads = grad_sequence(x.shape, seed=9, steps=6)
    param = x.clone().requires_grad_(True)
    adam = torch.optim.Adam([param], lr=lr, betas=(beta1, beta2), eps=1e-8, foreach=False)
    for g in grads:
        param.grad = g.clone()
        adam.step()
        with torch.no_grad():
            param.clamp_(lo, hi)
    ours, m, v = run_cw("reference", x, grads, lo, hi, lr=lr, beta1=beta1, beta2=beta2)
    state = adam.state[param]
    assert same_bits(ours, param.detach())
    assert same_bits(m, state["exp_avg"]) and same_bits(v, state["exp_avg_sq"])


@pytest.mark.parametrize("n", SIZES)
def test_cw_fused_matches_reference(n):
    x, _, _, lo, hi = make_case(n, seed=10 + n, special_grads=False)
    grads = grad_sequence(n, seed=n, steps=5, scale=1e-2)
    ref = run_cw("reference", x, grads, lo, hi)
    fused = run_cw("fused", x, grads, lo, hi)
    assert same_bits(fused[1], ref[1]) and same_bits(fused[2], ref[2])  # m, v: the same ops
    assert_rel_close(fused[0], ref[0])
    if n > 1:  # the single pixel of n=1 sits on the box boundary
        assert not torch.equal(fused[0], x)


def test_cw_descends():
    target = torch.full((1000,), 0.3)
    x = torch.full((1000,), 0.8)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    lo, hi = torch.zeros_like(x), torch.ones_like(x)
    for t in range(1, 201):
        cw_step(x, 2 * (x - target), m, v, t, 0.01, lo, hi, impl="fused")  # gradient of |x - target|^2
    assert (x - target).abs().max() < 0.02


def test_cw_nan_gradient_propagates_like_adam():
    x, _, _, lo, hi = make_case(500, seed=11, special_grads=False)
    grads = grad_sequence(500, seed=12, steps=2)
    grads[1][7] = float("nan")
    ref = run_cw("reference", x, grads, lo, hi)
    fused = run_cw("fused", x, grads, lo, hi)
    for a, b in zip(fused, ref):
        assert torch.isnan(b[7]) and torch.isnan(b).sum() == 1
        assert_rel_close(a, b)


# ------------------------------------------------------------------------------------------------------------
# Input checks and dispatch
# ------------------------------------------------------------------------------------------------------------
def _pgd_args(n=8):
    x, _, grad, lo, hi = make_case(n, seed=13)
    return x, grad, lo, hi


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rejects_non_float32_x(dtype):
    x, grad, lo, hi = _pgd_args()
    with pytest.raises(TypeError, match="float32"):
        pgd_step(x.to(dtype), grad.to(dtype), lo.to(dtype), hi.to(dtype), ALPHA, impl="fused")
    m = torch.zeros_like(x, dtype=dtype)
    with pytest.raises(TypeError, match="float32"):
        cw_step(x.to(dtype), grad.to(dtype), m, m.clone(), 1, 0.01, lo.to(dtype), hi.to(dtype), impl="reference")


def test_rejects_mismatched_inputs():
    x, grad, lo, hi = _pgd_args()
    with pytest.raises(TypeError, match="grad has dtype"):
        pgd_step(x, grad.half(), lo, hi, ALPHA)
    with pytest.raises(ValueError, match="hi has shape"):
        pgd_step(x, grad, lo, hi[:4], ALPHA)
    with pytest.raises(ValueError, match="lo is on meta"):
        pgd_step(x, grad, torch.empty(8, device="meta"), hi, ALPHA)
    with pytest.raises(ValueError, match="v has shape"):
        cw_step(x, grad, torch.zeros(8), torch.zeros(9), 1, 0.01, lo, hi)


def test_rejects_non_contiguous():
    x = torch.rand(8, 6)
    ok = torch.zeros(6, 8)
    with pytest.raises(ValueError, match="x must be contiguous"):
        pgd_step(x.t(), ok, ok, ok, ALPHA)
    with pytest.raises(ValueError, match="m must be contiguous"):
        cw_step(ok, ok, torch.zeros(8, 6).t(), ok.clone(), 1, 0.01, ok, ok)


def test_rejects_bad_alpha_step_and_impl():
    x, grad, lo, hi = _pgd_args()
    with pytest.raises(ValueError, match="one per sample"):
        pgd_step(x.view(2, 4), grad.view(2, 4), lo.view(2, 4), hi.view(2, 4), torch.ones(3))
    with pytest.raises(TypeError, match="alpha tensor must be float32"):
        pgd_step(x, grad, lo, hi, torch.tensor([ALPHA], dtype=torch.float64))
    with pytest.raises(ValueError, match="impl must be one of"):
        pgd_step(x, grad, lo, hi, ALPHA, impl="cuda")
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        cw_step(x, grad, torch.zeros(8), torch.zeros(8), 0, 0.01, lo, hi)
    with pytest.raises(ValueError, match="beta2"):
        cw_step(x, grad, torch.zeros(8), torch.zeros(8), 1, 0.01, lo, hi, beta2=1.0)


def test_resolve_impl():
    assert resolve_impl("cpu") == "fused"
    assert resolve_impl("cuda") == ("triton" if HAS_TRITON and not IN_INTERPRETER else "fused")
    assert resolve_impl("cpu", "reference") == "reference"


@pytest.mark.skipif(not HAS_TRITON or IN_INTERPRETER, reason="needs triton, outside the interpreter")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    x, grad, lo, hi = _pgd_args()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pgd_step(x, grad, lo, hi, ALPHA, impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cw_step(x, grad, torch.zeros(8), torch.zeros(8), 1, 0.01, lo, hi, impl="triton")


def _run_python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_package_imports_and_runs_without_triton():
    code = """
        import sys
        class BlockTriton:  # make `import triton` fail as on a machine without it
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked")
        sys.meta_path.insert(0, BlockTriton())
        import torch
        from advface_fast.kernels import pgd_step, cw_step, linf_bounds, resolve_impl
        x0 = torch.rand(10); lo, hi = linf_bounds(x0, 0.1); x = x0.clone()
        pgd_step(x, torch.randn(10), lo, hi, 0.05)
        cw_step(x, torch.randn(10), torch.zeros(10), torch.zeros(10), 1, 0.01, lo, hi)
        assert resolve_impl("cuda") == "fused"
        try:
            pgd_step(x, torch.randn(10), lo, hi, 0.05, impl="triton")
        except RuntimeError as err:
            assert "not installed" in str(err), err
        else:
            raise AssertionError("impl='triton' without triton did not raise")
        assert "triton" not in sys.modules
        print("OK")
    """
    proc = _run_python(code, {})
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_triton_subprocess_suite():
    """Run the test_triton_interp_* tests below in a fresh process with TRITON_INTERPRET=1."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
         "-k", "triton_interp"],
        cwd=REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


# ------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (collected only when TRITON_INTERPRET=1; see the module docstring)
# ------------------------------------------------------------------------------------------------------------
if IN_INTERPRETER and HAS_TRITON:

    @pytest.mark.parametrize("n", SIZES)
    def test_triton_interp_pgd_bitwise(n):
        x, _, grad, lo, hi = make_case(n, seed=n)
        ref = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference")
        tri_in = x.clone()
        tri = pgd_step(tri_in, grad, lo, hi, ALPHA, impl="triton")
        assert tri is tri_in and same_bits(tri, ref)

    def test_triton_interp_pgd_block_sizes_and_empty():
        x, _, grad, lo, hi = make_case(3001, seed=14)
        ref = pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference")
        for block in (16, 128, 4096):
            assert same_bits(pgd_step_triton(x.clone(), grad, lo, hi, ALPHA, block_size=block), ref)
        empty = torch.empty(0)
        assert pgd_step(empty, empty, empty, empty, ALPHA, impl="triton").numel() == 0

    def test_triton_interp_pgd_per_sample_alpha_and_nan_x():
        x, _, grad, lo, hi = make_case((3, 3, 11, 13), seed=15)
        x.view(-1)[100] = float("nan")
        alphas = torch.tensor([1 / 255, 2 / 255, 0.5 / 255])
        ref = pgd_step(x.clone(), grad, lo, hi, alphas, impl="reference")
        assert same_bits_any_nan(pgd_step(x.clone(), grad, lo, hi, alphas, impl="triton"), ref)
        assert torch.isnan(ref.view(-1)[100])
        single = pgd_step(x.clone(), grad, lo, hi, torch.tensor([ALPHA]), impl="triton")
        assert same_bits_any_nan(single, pgd_step(x.clone(), grad, lo, hi, ALPHA, impl="reference"))

    @pytest.mark.parametrize("n", SIZES)
    def test_triton_interp_cw_close(n):
        x, _, _, lo, hi = make_case(n, seed=20 + n, special_grads=False)
        grads = grad_sequence(n, seed=n, steps=3, scale=1e-2)
        ref = run_cw("reference", x, grads, lo, hi)
        tri = run_cw("triton", x, grads, lo, hi)
        for a, b in zip(tri, ref):
            assert_rel_close(a, b)
        if n > 1:
            assert not torch.equal(tri[0], x)

    def test_triton_interp_cw_other_lerp_branch_and_nan():
        x, _, _, lo, hi = make_case(2000, seed=21, special_grads=False)
        grads = grad_sequence(2000, seed=22, steps=3)
        grads[1][5] = float("nan")
        ref = run_cw("reference", x, grads, lo, hi, lr=0.05, beta1=0.3, beta2=0.99)
        tri = run_cw("triton", x, grads, lo, hi, lr=0.05, beta1=0.3, beta2=0.99)
        for a, b in zip(tri, ref):
            assert torch.isnan(b[5])
            assert_rel_close(a, b)

    def test_triton_interp_auto_still_picks_fused_on_cpu():
        assert resolve_impl("cpu") == "fused"
        assert resolve_impl("cpu", "triton") == "triton"
