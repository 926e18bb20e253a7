"""The ONNX -> torch interpreter: small graphs vs onnxruntime, blocked DequantizeLinear, the clear
error for an unsupported op, gradients, and ``onnx:PATH`` models in the registry."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import need_module  # in CI mode a missing library fails
from _tolerances import FP32_NET, FP32_OPS, assert_close_to_scale, close_to_scale, scaled_error
import torch
from onnx import TensorProto, helper, numpy_helper

from advface_fast.models import create_model, get_model_spec
from advface_fast.models.onnx_torch import (OnnxModule, UnsupportedOnnxOpError, dequantize_onnx,
                                            prune_graph_inputs)

ort = need_module("onnxruntime")


def run_ort(model, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, inits, opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def face_like_graph(rng, n_emb=16):
    """Conv (asymmetric pads) -> BN -> PRelu -> MaxPool -> depthwise Conv -> Relu -> Add
    (residual) -> AveragePool -> Mul -> Sigmoid -> Concat -> Transpose x2 -> GlobalAveragePool ->
    Flatten -> Gemm -> Reshape -> MatMul -> ReduceL2 / Div (L2 normalise)."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 0, 2, 1], strides=[1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["bn"], epsilon=1e-3, name="bn1"),
        helper.make_node("PRelu", ["bn", "slope"], ["pr"], name="prelu1"),
        helper.make_node("MaxPool", ["pr"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["mp", "wdw"], ["dw"], group=8, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["dw"], ["r"]),
        helper.make_node("Add", ["r", "mp"], ["res"]),
        helper.make_node("AveragePool", ["res"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Mul", ["ap", "half"], ["mu"]),
        helper.make_node("Sigmoid", ["mu"], ["sg"]),
        helper.make_node("Concat", ["sg", "ap"], ["cat"], axis=1),
        helper.make_node("Transpose", ["cat"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["t2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["fl"], axis=1),
        helper.make_node("Gemm", ["fl", "wfc", "bfc"], ["fc"], transB=1),
        helper.make_node("Reshape", ["fc", "shape"], ["rs"]),
        helper.make_node("MatMul", ["rs", "wmm"], ["mm"]),
        helper.make_node("ReduceL2", ["mm", "axes"], ["nrm"], keepdims=1),
        helper.make_node("Div", ["mm", "nrm"], ["y"]),
    ]
    inits = [init("w1", f(8, 3, 3, 3)), init("b1", f(8)), init("g", f(8)), init("be", f(8)),
             init("m", f(8)), init("v", np.abs(f(8)) + 0.5), init("slope", f(8, 1, 1) * 0.2),
             init("wdw", f(8, 1, 3, 3)), init("half", np.float32(0.5)),
             init("wfc", f(24, 16)), init("bfc", f(24)), init("shape", np.array([0, -1], np.int64)),
             init("wmm", f(24, n_emb)), init("axes", np.array([1], np.int64))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 20, 18])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_emb])
    return make_model(nodes, [x], [y], inits)


def test_small_face_graph_matches_onnxruntime():
    rng = np.random.default_rng(0)
    model = face_like_graph(rng)
    x = rng.standard_normal((3, 3, 20, 18)).astype(np.float32)
    (ref,) = run_ort(model, {"x": x})
    with torch.no_grad():
        ours = OnnxModule(model)(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (3, 16)
    assert np.abs(ours - ref).max() <= 1e-5


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    net = OnnxModule(face_like_graph(rng)).double()
    x = torch.from_numpy(rng.standard_normal((2, 3, 20, 18))).requires_grad_(True)
    assert torch.autograd.gradcheck(net, (x,), eps=1e-6, atol=1e-5)


def quantized_linear(rng, block, axis):
    """y = x @ dequant(Wq).T with W int8 blocked along `axis`, plus a per-axis int8 bias."""
    wq = rng.integers(-128, 128, size=(6, 20), dtype=np.int8)
    n_blocks = -(-wq.shape[axis] // block)
    sshape = (6, n_blocks) if axis == 1 else (n_blocks, 20)
    scale = (rng.random(sshape) * 0.01 + 1e-3).astype(np.float32)
    zp = rng.integers(-20, 20, size=sshape, dtype=np.int8)
    bq = rng.integers(-128, 128, size=(6,), dtype=np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=axis, block_size=block, name="dq_w"),
        helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"], axis=0, name="dq_b"),
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
    ]
    inits = [init("wq", wq), init("ws", scale), init("wz", zp), init("bq", bq),
             init("bs", (rng.random(6) * 0.1).astype(np.float32))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])
    return make_model(nodes, [x], [y], inits)


@pytest.mark.parametrize("block,axis", [(8, 1), (20, 1), (4, 0)])
def test_blocked_dequantize_matches_onnxruntime(block, axis):
    rng = np.random.default_rng(block + axis)
    model = quantized_linear(rng, block, axis)
    x = rng.standard_normal((4, 20)).astype(np.float32)
    (ref,) = run_ort(model, {"x": x})  # onnxruntime's own DequantizeLinear
    (ref_np,) = run_ort(dequantize_onnx(model), {"x": x})  # the numpy rewrite
    with torch.no_grad():
        ours = OnnxModule(model)(torch.from_numpy(x)).numpy()
    assert_close_to_scale(ours, ref, FP32_OPS)  # |y| up to ~15: a 20-term Gemm, tolerance relative to it
    assert_close_to_scale(ref_np, ref, FP32_OPS)
    assert not any(n.op_type == "DequantizeLinear" for n in dequantize_onnx(model).graph.node)


def test_constants_are_folded_at_load_time():
    model = quantized_linear(np.random.default_rng(0), 8, 1)
    net = OnnxModule(model)
    assert [s.op for s in net.steps] == ["Gemm"]
    assert {b.dtype for b in net.buffers()} == {torch.float32}


def test_unused_graph_inputs_are_ignored_and_pruned():
    model = quantized_linear(np.random.default_rng(0), 8, 1)
    model.graph.input.append(helper.make_tensor_value_info("stale_weight", TensorProto.FLOAT, [6, 20]))
    assert OnnxModule(model).input_names == ["x"]
    assert [i.name for i in prune_graph_inputs(model).graph.input] == ["x"]


def unsupported_model():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Erf", ["r"], ["e"], name="gelu_erf"),
             helper.make_node("Hardmax", ["e"], ["y"], name="later")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return make_model(nodes, [x], [y], [], opset=17)


def test_unsupported_op_names_the_first_op_and_node(tmp_path):
    with pytest.raises(UnsupportedOnnxOpError, match=r"'Erf' in node 'gelu_erf' \(node #1\)"):
        OnnxModule(unsupported_model())
    path = tmp_path / "bad.onnx"
    path.write_bytes(unsupported_model().SerializeToString())
    with pytest.raises(UnsupportedOnnxOpError, match="Erf"):
        create_model(f"onnx:{path}", input_size=(1, 4))


def test_custom_domain_op_is_refused():
    model = unsupported_model()
    model.graph.node[1].op_type = "Relu"
    model.graph.node[1].domain = "com.microsoft"
    with pytest.raises(UnsupportedOnnxOpError, match="com.microsoft"):
        OnnxModule(model)


def tiny_face_onnx(tmp_path, metadata=None):
    """A 3 x 8 x 8 -> 5-d 'face model' file: Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["emb"], transB=1)]
    inits = [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             init("fc", rng.standard_normal((5, 4)).astype(np.float32))]
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 5])
    model = make_model(nodes, [x], [y], inits)
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    return path, model


def test_onnx_prefix_builds_a_model_with_the_stated_preprocessing(tmp_path):
    path, model = tiny_face_onnx(tmp_path)
    net = create_model(f"onnx:{path}", channel_order="bgr", mean=(10.0, 20.0, 30.0), std=2.0)
    spec = get_model_spec(f"onnx:{path}", channel_order="bgr", mean=(10.0, 20.0, 30.0), std=2.0)
    assert net.spec.input_size == spec.input_size == (8, 8)  # read from the graph's input shape
    assert spec.embedding_dim == 5 and spec.alignment["aligner"] == "mtcnn"
    x = np.random.default_rng(4).random((1, 3, 8, 8)).astype(np.float32)
    feed = (x[:, ::-1] * 255 - np.array([10, 20, 30], np.float32).reshape(1, 3, 1, 1)) / 2.0
    (ref,) = run_ort(model, {"data": np.ascontiguousarray(feed, dtype=np.float32)})
    with torch.no_grad():
        ours = net(torch.from_numpy(x)).numpy()
    # Outputs of magnitude ~380: float32 rounding is relative (one ulp there is 3e-5), so the check is too.
    assert_close_to_scale(ours, ref, FP32_NET)
    assert len(net.weights_sha256) == 64


def test_onnx_prefix_check_passes_rounding_and_fails_a_wrong_preprocessing(tmp_path):
    """The check above, tested: outputs a few ulps away (another CPU's kernels) pass, though one ulp
    of the largest output already broke the old absolute 1e-5; a model built with a mean 0.5 off,
    a std off by 128 / 127.5 or the wrong channel order fails, far beyond the tolerance."""
    path, model = tiny_face_onnx(tmp_path)
    x = np.random.default_rng(4).random((1, 3, 8, 8)).astype(np.float32)
    mean, std = np.array([10, 20, 30], np.float32).reshape(1, 3, 1, 1), np.float32(2.0)
    feed = (x[:, ::-1] * 255 - mean) / std  # the stated preprocessing by hand: BGR, 0..255, (x - mean) / std
    (ref,) = run_ort(model, {"data": np.ascontiguousarray(feed, dtype=np.float32)})
    assert np.abs(ref).max() > 100  # the magnitudes that broke the absolute check

    away = np.where(ref < 0, np.float32(-np.inf), np.float32(np.inf))
    one_ulp, four_ulps = np.nextafter(ref, away), ref
    for _ in range(4):
        four_ulps = np.nextafter(four_ulps, away)
    noise = ref * (1 + np.random.default_rng(5).uniform(-1e-6, 1e-6, ref.shape)).astype(np.float32)
    assert np.abs(one_ulp - ref).max() > 1e-5  # what the old absolute check refused
    for rounded in (one_ulp, four_ulps, noise):
        assert close_to_scale(rounded, ref, FP32_NET)

    settings = dict(channel_order="bgr", mean=(10.0, 20.0, 30.0), std=2.0)
    with torch.no_grad():
        assert close_to_scale(create_model(f"onnx:{path}", **settings)(torch.from_numpy(x)).numpy(), ref, FP32_NET)
    for wrong in (dict(mean=(10.5, 20.0, 30.0)), dict(std=2.0 * 128 / 127.5), dict(channel_order="rgb")):
        net = create_model(f"onnx:{path}", **{**settings, **wrong})
        with torch.no_grad():
            out = net(torch.from_numpy(x)).numpy()
        assert scaled_error(out, ref) > 10 * FP32_NET, wrong
        with pytest.raises(AssertionError, match="reference's scale"):
            assert_close_to_scale(out, ref, FP32_NET)


def test_onnx_settings_from_metadata(tmp_path):
    path, _ = tiny_face_onnx(tmp_path, {"channel_order": "bgr", "mean": "127.5", "std": "128",
                                        "aligner": "mtcnn"})
    net = create_model(f"onnx:{path}")
    assert net.net is not None and net.channel_order == "bgr"
    assert torch.allclose(net.shift, torch.full((1, 3, 1, 1), -127.5 / 128))


def test_onnx_prefix_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model(f"onnx:{tmp_path / 'missing.onnx'}")
    path, _ = tiny_face_onnx(tmp_path)
    with pytest.raises(ValueError, match="channel_order"):
        create_model(f"onnx:{path}", channel_order="grb")
    with pytest.raises(ValueError, match="embedding_dim 7"):
        create_model(f"onnx:{path}", embedding_dim=7)


def test_fold_batchnorm_keeps_the_function():
    from advface_fast.models.onnx_torch import fold_batchnorm

    rng = np.random.default_rng(5)
    net = OnnxModule(face_like_graph(rng))
    folded = fold_batchnorm(net)
    assert [s.op for s in net.steps].count("BatchNormalization") == 1
    assert [s.op for s in folded.steps].count("BatchNormalization") == 0
    assert len(folded.steps) == len(net.steps) - 1
    x = torch.from_numpy(rng.standard_normal((2, 3, 20, 18)).astype(np.float32))
    with torch.no_grad():
        assert (folded(x) - net(x)).abs().max() <= 1e-5
    assert fold_batchnorm(folded).steps[0].inputs == folded.steps[0].inputs  # folding twice is a no-op


def test_fold_batchnorm_leaves_a_shared_conv_output_alone():
    rng = np.random.default_rng(6)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Add", ["bn", "c"], ["y"])]  # the conv output is also read here
    inits = [init("w", f(2, 3, 1, 1)), init("g", f(2)), init("b", f(2)), init("m", f(2)),
             init("v", np.abs(f(2)) + 1)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    from advface_fast.models.onnx_torch import fold_batchnorm

    assert [s.op for s in fold_batchnorm(OnnxModule(model)).steps] == ["Conv", "BatchNormalization", "Add"]


def test_shape_arithmetic_slice_and_pad_match_onnxruntime():
    """The patterns exporters emit: Shape -> Gather (0-d index) -> Unsqueeze -> Concat ->
    ConstantOfShape / Pad, and Slice with negative and non-unit steps."""
    rng = np.random.default_rng(7)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Constant", [], ["idx"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Gather", ["shp", "idx"], ["c"], axis=0),  # a 0-d channel count
        helper.make_node("Unsqueeze", ["c", "ax0"], ["c1"]),
        helper.make_node("Concat", ["zeros2", "c1", "zeros5"], ["pads"], axis=0),  # pad C at its end by C
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="constant"),
        helper.make_node("Slice", ["padded", "st", "en", "axs", "stp"], ["sl"]),
        helper.make_node("Pad", ["sl", "epads"], ["edge"], mode="edge"),
        helper.make_node("ConstantOfShape", ["shp"], ["ones"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
        helper.make_node("Mul", ["x", "ones"], ["x2"]),
        helper.make_node("ReduceSum", ["x2", "ax0"], ["y2"], keepdims=0),
    ]
    inits = [init("ax0", i64(0)), init("zeros2", i64(0, 0)), init("zeros5", i64(0, 0, 0, 0, 0)),
             init("st", i64(-1, 0)), init("en", i64(-(2 ** 63), 9)), init("axs", i64(3, 1)), init("stp", i64(-1, 2)),
             init("epads", i64(0, 0, 1, 2, 0, 0, 3, 0))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])
    outs = [helper.make_tensor_value_info("edge", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)]
    model = make_model(nodes, [x], outs, inits)
    xv = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    ref = run_ort(model, {"x": xv})
    with torch.no_grad():
        ours = OnnxModule(model)(torch.from_numpy(xv))
    assert [tuple(o.shape) for o in ours] == [r.shape for r in ref]
    assert all(np.abs(o.numpy() - r).max() <= 1e-6 for o, r in zip(ours, ref))


def test_runs_the_librarys_own_export_of_dlib_resnet(tmp_path):
    """Any exporter-made face model: the TorchScript export of dlib-resnet (Shape/Gather/Concat/Pad
    shape arithmetic around zero-padded residual adds) runs and matches the torch model."""
    need_module("dlib")
    from advface_fast.onnx_export import export_onnx

    model = create_model("dlib-resnet", cache_dir=tmp_path)
    path = export_onnx(model, tmp_path / "dlib.onnx")
    net = create_model(f"onnx:{path}", mean=0.0, std=255.0)  # the graph takes [0, 1] images itself
    assert net.spec.input_size == (150, 150) and net.spec.embedding_dim == 128
    x = torch.rand(3, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() <= 1e-5
    fast = create_model(f"onnx:{path}", mean=0.0, std=255.0, fast=True)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() <= 1e-5


def test_input_size_from_metadata_when_the_graph_does_not_fix_it(tmp_path):
    path, model = tiny_face_onnx(tmp_path, {"input_size": "8,8"})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"  # symbolic H, W: only the metadata tells
    path.write_bytes(model.SerializeToString())
    assert create_model(f"onnx:{path}").spec.input_size == (8, 8)
    del model.metadata_props[:]
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="input_size"):
        create_model(f"onnx:{path}")
    assert create_model(f"onnx:{path}", input_size=(8, 8)).input_size == (8, 8)


def depthwise_graph(rng, **conv_attrs):
    """x (1 x 4 x 9 x 9) -> a grouped Conv with ``conv_attrs`` (bias given) -> y."""
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=4, **conv_attrs)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 9, 9])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init("w", w), init("b", b)])


@pytest.mark.parametrize("attrs, rewritten", [
    ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, True),
    ({"strides": [3, 2], "pads": [0, 1, 0, 1]}, True),
    ({"strides": [1, 1], "pads": [1, 1, 1, 1]}, False),  # stride 1
    ({"strides": [2, 2], "pads": [0, 0, 1, 1]}, False),  # asymmetric pads
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, False),
    ({"strides": [2, 2], "auto_pad": "VALID"}, False),
    ({"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2]}, False),
])
def test_dilate_strided_grouped_convs_rewrites_only_what_it_supports(attrs, rewritten):
    """The fast copy's rewrite (onnx_torch.dilate_strided_grouped_convs) on one grouped Conv: applied
    exactly where the dilated form holds; the same forward; in bf16 the input gradient within bf16
    rounding of fp32 autograd (the rewritten step's own backward), in fp32 the plain op itself."""
    from advface_fast.models.onnx_torch import DILATED_CONV, dilate_strided_grouped_convs, fold_batchnorm

    rng = np.random.default_rng(9)
    net = OnnxModule(depthwise_graph(rng, **attrs))
    dilated, count = dilate_strided_grouped_convs(net)
    assert count == int(rewritten) and [s.op for s in dilated.steps] == [DILATED_CONV if rewritten else "Conv"]
    assert dilate_strided_grouped_convs(dilated)[1] == 0 and fold_batchnorm(dilated).steps[0].op == dilated.steps[0].op
    x = torch.from_numpy(rng.standard_normal((2, 4, 9, 9)).astype(np.float32))
    g = None
    grads = []
    for module in (net, dilated):
        for dtype in (torch.float32, torch.bfloat16):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                y = module(xi)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)) if g is None else g
            y.float().mul(g).sum().backward()
            grads.append((y.detach().float(), xi.grad))
    (y32, g32), (y16, g16), (y32d, g32d), (y16d, g16d) = grads
    assert torch.equal(y32d, y32) and torch.equal(g32d, g32)  # fp32: the plain op
    assert (y16d - y16).abs().max() <= 2 ** -7 * y32.abs().max()
    assert (g16d - g32).abs().max() <= 2 ** -6 * g32.abs().max()
