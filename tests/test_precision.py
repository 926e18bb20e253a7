"""Precision policy (CPU features, auto/bf16 resolution, autocast), the fast dlib-resnet copy
(folded affine, channels_last, in-place residual add) and bf16 gradients in the attacks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from advface_fast import precision as prec
from advface_fast.attacks import CW, FGSM, PGD, make_attack
from advface_fast.models import create_model
from advface_fast.models.dlib_resnet import add_zero_padded
from advface_fast.models.fast import FastDlibResNet, add_zero_padded_, make_fast

CPUINFO_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
CPUINFO_AVX2 = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse sse2 avx avx2 fma
"""


@pytest.fixture
def cpuinfo(monkeypatch):
    """Set what /proc/cpuinfo says (None: no such file)."""
    def use(text):
        monkeypatch.setattr(prec, "_read_cpuinfo", lambda: text)
    return use


# ----------------------------------------------------------------------------- features, policy


def test_cpu_features_with_amx(cpuinfo):
    cpuinfo(CPUINFO_AMX)
    feats = prec.cpu_features()
    assert feats["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
    assert feats["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert feats["flags_source"] is not None
    assert prec.native_bf16("cpu")
    assert prec.resolve_precision("auto", "cpu") == "bf16"


def test_cpu_without_bf16_keeps_fp32_and_warns_on_explicit_bf16(cpuinfo):
    cpuinfo(CPUINFO_AVX2)
    feats = prec.cpu_features()
    assert feats["flags"]["avx2"] and not feats["flags"]["avx512_bf16"] and not feats["flags"]["amx_bf16"]
    assert not prec.native_bf16("cpu")
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert prec.resolve_precision("bf16", "cpu") == "bf16"


def test_avx512_bf16_alone_counts_as_native(cpuinfo):
    cpuinfo(CPUINFO_AVX2.replace("fma", "fma avx512f avx512_bf16"))
    assert prec.native_bf16("cpu") and prec.resolve_precision("auto") == "bf16"


def test_no_cpuinfo_means_unknown_not_guessed(cpuinfo):
    cpuinfo(None)
    feats = prec.cpu_features()
    assert all(v is None for v in feats["flags"].values()) and feats["flags_source"] is None
    assert feats["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not prec.native_bf16("cpu")
    assert prec.resolve_precision("auto", "cpu") == "fp32"


def test_resolve_precision_checks_its_argument(cpuinfo):
    cpuinfo(CPUINFO_AMX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 and native bf16: no warning
        assert prec.resolve_precision("fp32", "cpu") == "fp32"
        assert prec.resolve_precision("bf16", "cpu") == "bf16"
    for bad in ("fp16", "float32", None):
        with pytest.raises(ValueError, match="precision"):
            prec.resolve_precision(bad, "cpu")


def test_device_features_cpu():
    feats = prec.device_features("cpu")
    assert feats["type"] == "cpu" and feats["threads"] == torch.get_num_threads()
    assert set(prec.CPU_FLAGS) == set(feats["flags"])


def test_autocast_contexts():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with prec.autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with prec.autocast("bf16", torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="resolved"):
        prec.autocast("auto", "cpu")


# ----------------------------------------------------------------------------- a tiny model


class Tiny(nn.Module):
    input_size = (16, 16)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(32, 8))

    def forward(self, x):
        if hasattr(self, "seen"):
            self.seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return self.net(x - 0.5)


def test_model_device_reads_the_first_parameter_and_falls_back():
    assert prec.model_device(Tiny()) == torch.device("cpu")
    assert prec.model_device(nn.Identity()) == torch.device("cpu")
    assert prec.model_device(nn.Identity(), "meta") == torch.device("meta")
    assert prec.model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


# ----------------------------------------------------------------------------- fast model


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return create_model("dlib-resnet", cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def chips(ci_chips):
    """Real aligned LFW chips (dlib's own alignment) as N x 3 x 150 x 150 float in [0, 1]."""
    return torch.from_numpy(ci_chips).permute(0, 3, 1, 2).float().div(255.0)


SWITCHES = [dict(), dict(fold_affine=False), dict(channels_last=False), dict(inplace=False),
            dict(fold_affine=False, channels_last=False, inplace=False), dict(stem="plain"), dict(stem="polyphase"),
            dict(channels_last=False, stem="polyphase"), dict(frozen_convs=True)]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "all")
def test_fast_copy_matches_plain_model_on_real_chips(plain, chips, switches):
    fast = make_fast(plain, **switches)
    with torch.no_grad():
        want, got = plain(chips), fast(chips)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert (got - want).abs().max() <= 1e-5
    # channels_last input gives the same answer
    with torch.no_grad():
        got_cl = fast(chips.contiguous(memory_format=torch.channels_last))
    assert (got_cl - want).abs().max() <= 1e-5


def input_gradient(model, x):
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
    return x.grad


def test_fast_copy_input_gradients_match_and_params_stay_frozen(plain, chips):
    """Folding moves fp32 rounding, which flips a few ReLUs sitting at ~0 and so moves a few
    gradient entries: the fast gradient must be as close to the fp64 one as the plain one is.
    Here the NCHW and NHWC kernels sum alike (2e-5 of the gradient's norm apart); on a CPU where
    oneDNN sums them in other orders, one ulp on every convolution output moves this gradient by
    3.5e-3 of its norm (simulated), hence 1e-2 of the norm for the fast and the unfolded copies."""
    fast = make_fast(plain)
    assert all(not p.requires_grad for p in fast.parameters())
    assert fast.blocks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = chips[:4]
    g_plain, g_fast = input_gradient(plain, x), input_gradient(fast, x)
    g_exact = input_gradient(make_fast(plain, fold_affine=False, channels_last=False, inplace=False).double(),
                             x.double())
    assert g_plain.abs().max() > 0
    assert (g_fast - g_plain).norm() <= 1e-2 * g_plain.norm()
    assert (g_fast.double() - g_exact).norm() <= 1.5 * (g_plain.double() - g_exact).norm() + 1e-9
    # without folding only layout and in-place writes change, but the layout picks other oneDNN kernels
    g_unfolded = input_gradient(make_fast(plain, fold_affine=False), x)
    assert (g_unfolded - g_plain).norm() <= 1e-2 * g_plain.norm()


def test_fast_copy_leaves_the_original_alone(plain, chips):
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fast = make_fast(plain)
    with torch.no_grad():
        fast.stem.conv.weight.zero_()
        fast.blocks[0].conv1.weight.zero_()
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert all(not v.is_contiguous(memory_format=torch.channels_last) or v.ndim < 4 or v.shape[-1] == 1
               for v in plain.state_dict().values())


def test_create_model_fast(tmp_path):
    fast = create_model("dlib-resnet", fast=True, cache_dir=tmp_path)
    assert isinstance(fast, FastDlibResNet) and fast.spec.name == "dlib-resnet"
    assert fast.dat_sha256 and not fast.training
    with pytest.raises(TypeError):
        make_fast(Tiny())
    with pytest.raises(TypeError):
        make_fast(fast)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("y_shape,s_shape", [
    ((2, 8, 5, 5), (2, 8, 5, 5)),  # plain block
    ((2, 8, 5, 5), (2, 4, 5, 5)),  # downsampling block, channel pad only
    ((2, 8, 3, 3), (2, 4, 4, 4)),  # downsampling block where the shortcut is larger spatially
    ((2, 8, 1, 1), (2, 8, 2, 2)),
])
def test_inplace_zero_padded_add_matches_and_backpropagates(y_shape, s_shape, layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, y_shape[1], 1)
    inp = torch.randn(y_shape[0], 3, *y_shape[2:]).contiguous(memory_format=layout).requires_grad_(True)
    s = torch.randn(s_shape).contiguous(memory_format=layout).requires_grad_(True)
    want = add_zero_padded(conv(inp), s)
    (g_inp, g_s) = torch.autograd.grad((want.relu() * torch.arange(want.numel()).view_as(want)).sum(), (inp, s))
    got = add_zero_padded_(conv(inp), s)
    assert got.shape == want.shape and torch.equal(got, want)
    (h_inp, h_s) = torch.autograd.grad((got.relu_() * torch.arange(got.numel()).view_as(got)).sum(), (inp, s))
    assert torch.allclose(h_inp, g_inp) and torch.allclose(h_s, g_s)


# ----------------------------------------------------------------------------- precision in attacks


def pairs(model, n=4, size=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255
    with torch.no_grad():
        gallery = model(torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255)
    return q, gallery, torch.arange(n) % 2 == 0


def test_attacks_take_precision_and_record_it(cpuinfo):
    cpuinfo(CPUINFO_AMX)
    model = Tiny().eval().requires_grad_(False)
    for name in ("fgsm", "pgd", "cw", "cw-l2", "noise"):
        attack = make_attack(name, model, precision="bf16")
        assert attack.precision == "bf16" and attack.config()["precision"] == "bf16"
        rebuilt = make_attack(model=model, **attack.config())
        assert rebuilt.config() == attack.config()
        fp32 = make_attack(name, model)
        assert fp32.precision == "fp32" and "precision" not in fp32.config()  # fp32 configs unchanged
    assert PGD(model, precision="auto").precision == "bf16"
    cpuinfo(CPUINFO_AVX2)
    assert PGD(model, precision="auto").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        FGSM(model, precision="half")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attack_runs_the_model_in_its_precision_and_keeps_fp32_images(precision):
    model = Tiny().eval().requires_grad_(False)
    q, gallery, same = pairs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attack = PGD(model, eps=4, steps=2, precision=precision)
    model.seen = []
    x_adv = attack(q, gallery, same)
    autocast_on = {on for on, _ in model.seen}
    assert autocast_on == {precision == "bf16"}
    assert all(dtype == torch.float32 for _, dtype in model.seen)  # the iterate itself stays fp32
    assert x_adv.dtype == torch.float32
    assert (torch.round(x_adv * 255) - torch.round(q * 255)).abs().max() <= 4


def test_bf16_gradients_attack_the_real_model_about_as_well(plain, chips):
    """bf16 and fp32 PGD / C&W on real chips, judged by the plain fp32 model."""
    fast = make_fast(plain)
    q, g = chips[0::2][:4], chips[1::2][:4]
    with torch.no_grad():
        gallery = plain(g)
        clean = torch.nn.functional.cosine_similarity(plain(q), gallery)
    same = torch.ones(len(q), dtype=torch.bool)  # dodging: push the similarity down
    shifts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in ("fp32", "bf16"):
            for cls, kw in ((PGD, dict(steps=3)), (CW, dict(steps=3, kappa=10.0))):
                x_adv = cls(fast, eps=2, precision=p, **kw)(q, gallery, same, clean)
                with torch.no_grad():
                    sim = torch.nn.functional.cosine_similarity(plain(x_adv), gallery)
                shifts[cls.name, p] = float((clean - sim).mean())
    for name in ("pgd", "cw"):
        assert shifts[name, "fp32"] > 0.05
        assert shifts[name, "bf16"] >= 0.8 * shifts[name, "fp32"], shifts
