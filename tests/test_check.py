"""TensorRT-legal ONNX lint: one crafted bad graph per rule, and clean graphs that pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeres import targets
from edgeres.check import MODEL, check_onnx
from edgeres.errors import ExportError

ORIN = targets.load("jetson-orin-nano")
NANO = targets.load("jetson-nano")
CPU = targets.load("cpu")
X_SHAPE = [1, 3, 8, 8]


def init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qdq(x, out, prefix, *, scale=0.05, zp=0, dtype=np.int8, axis=None):
    """x -> QuantizeLinear -> DequantizeLinear -> out, with scale/zero-point initializers."""
    kw = {} if axis is None else {"axis": axis}
    s, zp_name, q = f"{prefix}_s", f"{prefix}_zp", f"{prefix}_q"
    nodes = [
        helper.make_node("QuantizeLinear", [x, s, zp_name], [q], f"q_{prefix}", **kw),
        helper.make_node("DequantizeLinear", [q, s, zp_name], [out], f"dq_{prefix}", **kw),
    ]
    return nodes, [init(f"{prefix}_s", scale), init(f"{prefix}_zp", zp, dtype)]


def weight(out, *, cout=4, cin=3, axis=0, per_channel=True):
    """Int8 conv weight [cout, cin, 3, 3] with a DequantizeLinear (no Q: stored as int8)."""
    w = np.random.default_rng(0).integers(-127, 128, size=(cout, cin, 3, 3)).astype(np.int8)
    n = w.shape[axis] if per_channel else 1
    scale = np.full(n, 0.01) if per_channel else 0.01
    node = helper.make_node("DequantizeLinear", ["w_int8", "w_s", "w_zp"], [out], "dq_w", axis=axis)
    zp = np.zeros(n, np.int8) if per_channel else 0
    return [node], [init("w_int8", w, np.int8), init("w_s", scale), init("w_zp", zp, np.int8)]


def model(nodes, inits, *, opset=17, x_shape=X_SHAPE, output="y", domains=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits,
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def conv_model(*, act=None, w=None, bn=False, opset=17, x_shape=X_SHAPE):
    """x -Q/DQ-> Conv(int8 weight) [-> BN] -> Relu -Q/DQ-> GlobalAveragePool -> y."""
    a_nodes, a_inits = act or qdq("x", "xq", "in")
    w_nodes, w_inits = w or weight("w")
    nodes = a_nodes + w_nodes + [helper.make_node("Conv", ["xq", "w", "b"], ["c"], "conv", pads=[1, 1, 1, 1])]
    inits = a_inits + w_inits + [init("b", np.zeros(4))]
    pre = "c"
    if bn:
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["bn"], "bn"))
        inits += [init(n, np.ones(4)) for n in ("g", "beta", "m", "v")]
        pre = "bn"
    nodes.append(helper.make_node("Relu", [pre], ["r"], "relu"))
    r_nodes, r_inits = qdq("r", "rq", "r")
    nodes += r_nodes + [helper.make_node("GlobalAveragePool", ["rq"], ["y"], "gap")]
    return model(nodes, inits + r_inits, opset=opset, x_shape=x_shape)


def residual_model(*, quantize_conv_branch):
    """x -Q/DQ-> xq; Conv(xq) -> c; Add(c or Q/DQ(c), xq) -> Relu -> y."""
    nodes, inits = qdq("x", "xq", "in")
    w_nodes, w_inits = weight("w", cout=3)
    nodes += w_nodes + [helper.make_node("Conv", ["xq", "w"], ["c"], "conv", pads=[1, 1, 1, 1])]
    inits += w_inits
    branch = "c"
    if quantize_conv_branch:
        c_nodes, c_inits = qdq("c", "cq", "c")
        nodes, inits, branch = nodes + c_nodes, inits + c_inits, "cq"
    nodes += [
        helper.make_node("Add", [branch, "xq"], ["s"], "add"),
        helper.make_node("Relu", ["s"], ["y"], "relu"),
    ]
    return model(nodes, inits)


def only(report, rule):
    found = [f for f in report.findings if f.rule == rule]
    assert found, f"no {rule} finding in {report.findings}"
    return found


def test_clean_qdq_conv_graph_passes():
    m = conv_model()
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones(X_SHAPE, np.float32)})[0].shape == (1, 4, 1, 1)
    report = check_onnx(m, ORIN)
    assert report.findings == [] and report.ok
    assert check_onnx(residual_model(quantize_conv_branch=False), ORIN).findings == []


def test_uint8_qdq_is_an_error():
    report = check_onnx(conv_model(act=qdq("x", "xq", "in", dtype=np.uint8)), ORIN)
    names = {f.node for f in only(report, "uint8-qdq")}
    assert names == {"q_in", "dq_in"} and not report.ok


def test_quantize_without_zero_point_is_uint8():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], "q_nozp"),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"], "dq_nozp")]
    report = check_onnx(model(nodes, [init("s", 0.1)]), ORIN)
    assert [f.node for f in only(report, "uint8-qdq")] == ["q_nozp"]


def test_uint8_is_fine_for_the_cpu_flavour():
    assert check_onnx(conv_model(act=qdq("x", "xq", "in", dtype=np.uint8)), CPU).findings == []


def test_nonzero_zero_point_is_an_error():
    report = check_onnx(conv_model(act=qdq("x", "xq", "in", zp=3)), ORIN)
    assert {f.node for f in only(report, "nonzero-zero-point")} == {"q_in", "dq_in"}
    assert all(f.severity == "error" for f in report.findings)


def test_per_channel_weight_not_on_axis_0_is_an_error():
    report = check_onnx(conv_model(w=weight("w", axis=1)), ORIN)
    (f,) = only(report, "per-channel-axis")
    assert f.node == "dq_w" and f.severity == "error" and "axis 1" in f.message


def test_per_channel_below_opset_13_is_an_error():
    report = check_onnx(conv_model(opset=12), ORIN)
    assert [f.node for f in only(report, "per-channel-opset")] == ["dq_w"]
    assert [f.node for f in only(report, "opset-range")] == [MODEL]


def test_opset_outside_profile_range_is_an_error():
    (f,) = check_onnx(conv_model(opset=18), ORIN).findings
    assert (f.rule, f.severity, f.node) == ("opset-range", "error", MODEL) and "13..17" in f.message
    assert check_onnx(conv_model(opset=17), NANO).rules() >= {"opset-range"}  # TensorRT 8.2: opset <= 13


def test_custom_domain_is_an_error():
    fq = helper.make_node("FakeQuantize", ["x", "lo", "hi", "lo", "hi"], ["y"], "fq0",
                          domain="org.openvinotoolkit", levels=256)
    m = model([fq], [init("lo", -1.0), init("hi", 1.0)], domains=["org.openvinotoolkit"])
    (f,) = check_onnx(m, ORIN).findings
    assert (f.rule, f.severity, f.node) == ("custom-domain", "error", "fq0")
    assert check_onnx(m, CPU).rules() == {"custom-domain"}
    contrib = helper.make_node("Gelu", ["x"], ["y"], "gelu", domain="com.microsoft")
    m2 = model([contrib], [], domains=["com.microsoft"])
    assert check_onnx(m2, CPU).findings == [] and check_onnx(m2, ORIN).rules() == {"custom-domain"}


def test_per_channel_activation_is_an_error():
    act = qdq("x", "xq", "in", scale=np.full(3, 0.05), zp=np.zeros(3), axis=1)
    report = check_onnx(conv_model(act=act), ORIN)
    assert [f.node for f in only(report, "per-channel-activation")] == ["dq_in"]


def test_residual_qdq_on_conv_branch_is_a_warning():
    report = check_onnx(residual_model(quantize_conv_branch=True), ORIN)
    (f,) = report.findings
    assert (f.rule, f.severity, f.node) == ("residual-qdq", "warning", "add") and report.ok


def test_unfolded_batchnorm_between_qdq_is_a_warning():
    (f,) = check_onnx(conv_model(bn=True), ORIN).findings
    assert (f.rule, f.severity, f.node) == ("fp32-between-qdq", "warning", "bn")


def test_op_without_int8_kernel_between_qdq_is_a_warning():
    nodes, inits = qdq("x", "xq", "in")
    nodes.append(helper.make_node("Softmax", ["xq"], ["sm"], "softmax"))
    s_nodes, s_inits = qdq("sm", "y", "sm")
    (f,) = check_onnx(model(nodes + s_nodes, inits + s_inits), ORIN).findings
    assert (f.rule, f.node) == ("fp32-between-qdq", "softmax")


def test_dynamic_shapes_other_than_batch_are_warnings():
    (f,) = check_onnx(conv_model(x_shape=["N", 3, "H", 8]), ORIN).findings
    assert (f.rule, f.severity, f.node) == ("dynamic-shape", "warning", "x") and "dimension 2" in f.message
    assert check_onnx(conv_model(x_shape=["N", 3, 8, 8]), ORIN).findings == []


def test_op_newer_than_the_boards_tensorrt():
    m = model([helper.make_node("Trilu", ["x"], ["y"], "tri")], [], opset=13)
    (f,) = check_onnx(m, NANO).findings
    assert (f.rule, f.severity, f.node) == ("unsupported-op", "error", "tri") and "8.2.1" in f.message
    assert check_onnx(m, ORIN).findings == []


def test_unnamed_nodes_get_a_stable_label():
    m = conv_model()
    for node in m.graph.node:
        node.name = ""
    m.graph.node[0].domain = "org.openvinotoolkit"
    (f,) = [f for f in check_onnx(m, ORIN).findings if f.rule == "custom-domain"]
    assert f.node == "QuantizeLinear#0"


def test_path_input_and_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(w=weight("w", axis=1)), path)
    report = check_onnx(path, "jetson-orin-nano")
    assert report.rules() == {"per-channel-axis"} and report.to_dict()["ok"] is False
    with pytest.raises(ExportError, match="per-channel-axis"):
        report.raise_for_errors()
    with pytest.raises(ExportError, match="not found"):
        check_onnx(tmp_path / "missing.onnx", ORIN)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="not a readable ONNX"):
        check_onnx(tmp_path / "bad.onnx", ORIN)


def test_zero_point_behind_identity_is_read():
    """The TorchScript exporter feeds scales and zero points through Identity nodes."""
    nodes = [helper.make_node("Identity", ["zp0"], ["zp_id"], "id_zp"),
             helper.make_node("QuantizeLinear", ["x", "s", "zp_id"], ["q"], "q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp_id"], ["y"], "dq")]
    for dtype, expected in ((np.int8, set()), (np.uint8, {"uint8-qdq"})):
        assert check_onnx(model(nodes, [init("s", 0.1), init("zp0", 0, dtype)]), ORIN).rules() == expected
