import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeres import models, targets
from edgeres.backends import Artifact, get_backend
from edgeres.errors import EdgeresError
from edgeres.export import export_onnx
from edgeres.memory import activation_memory, measure_peak, weight_bytes
from edgeres.peakmem import can_measure


def _graph(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_liveness_by_hand_alias_and_in_place():
    # X -> Relu -> A (new: never write into the caller's input) -> Flatten -> F (alias of A)
    #   -> Relu -> B (in place over A/F, which die here) -> Add(B, X) -> Y (in place over B)
    nodes = [
        helper.make_node("Relu", ["X"], ["A"]),
        helper.make_node("Flatten", ["A"], ["F"], axis=1),
        helper.make_node("Relu", ["F"], ["B"]),
        helper.make_node("Add", ["B", "X"], ["Y"]),
    ]
    model = _graph(nodes, [_vi("X", ["batch", 8])], [_vi("Y", ["batch", 8])])
    mem = activation_memory(model, batch=2)
    assert mem.peak_bytes == 2 * 2 * 8 * 4  # X and one buffer shared by A, F, B and Y
    assert mem.runtime_peak_bytes == 2 * 8 * 4
    assert mem.buffers == 2
    assert mem.input_bytes == mem.output_bytes == 64


def test_a_tensor_still_needed_is_not_overwritten():
    # A is read again by the Add, so the second Relu needs its own buffer.
    nodes = [
        helper.make_node("Relu", ["X"], ["A"]),
        helper.make_node("Relu", ["A"], ["B"]),
        helper.make_node("Add", ["A", "B"], ["Y"]),
    ]
    model = _graph(nodes, [_vi("X", [1, 8])], [_vi("Y", [1, 8])])
    mem = activation_memory(model, batch=1)
    assert mem.buffers == 3  # X, A, B; Y reuses B
    assert mem.peak_bytes == 2 * 32  # X is dead after the first Relu; A and B live together


def test_int8_rule_one_byte_only_for_quantized_inputs():
    w = numpy_helper.from_array(torch.zeros(4, 4, 1, 1).numpy(), "W")
    nodes = [helper.make_node("Relu", ["X"], ["A"]), helper.make_node("Conv", ["A", "W"], ["Y"])]
    model = _graph(nodes, [_vi("X", [1, 4, 2, 2])], [_vi("Y", [1, 4, 2, 2])], [w])
    # X and Y are graph I/O (fp32, 64 bytes each); A feeds only the Conv (int8: 16 bytes, fp16: 32).
    # X dies at the Relu, so the peak is one I/O tensor plus A.
    assert activation_memory(model, batch=1, precision="int8").peak_bytes == 64 + 16
    assert activation_memory(model, batch=1, precision="fp16").peak_bytes == 64 + 32
    assert activation_memory(model, batch=1, precision="fp32").peak_bytes == 64 + 64
    with pytest.raises(EdgeresError, match="precision"):
        activation_memory(model, batch=1, precision="int4")


def test_weight_bytes_per_precision():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    params = sum(p.numel() for p in net.parameters())
    assert weight_bytes(net, "fp32") == 4 * params
    assert weight_bytes(net, "fp16") == 2 * params
    conv, bn, fc = 3 * 8 * 9, 16, 16
    assert weight_bytes(net, "int8") == conv + 4 * 8 + 4 * bn + fc + 4 * 2 + 4 * 2  # + scales, fp32 BN and bias


@pytest.fixture(scope="module")
def wrn_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("wrn")
    paths = {}
    for k in (1, 2, 4):
        torch.manual_seed(0)
        paths[k] = export_onnx(models.create(f"wrn-10-{k}"), d / f"wrn-10-{k}.onnx", input_size=32)
    return paths


def test_conv_add_fusion_saves_a_wide_tensor(wrn_onnx):
    graph = onnx.load(str(wrn_onnx[2]))
    fused = activation_memory(graph, batch=4)
    plain = activation_memory(graph, batch=4, fuse_conv_add=False)
    unit = 4 * 32 * 32 * 32 * 4  # one stage-1 tensor of wrn-10-2 at batch 4
    assert plain.runtime_peak_bytes - fused.runtime_peak_bytes == pytest.approx(unit / 2, rel=0.01)


needs_proc = pytest.mark.skipif(not can_measure(), reason="the peak RSS is reset through /proc/self/clear_refs (Linux)")


@needs_proc
@pytest.mark.parametrize("k", [1, 2, 4])
def test_onnxruntime_peak_matches_the_estimate(wrn_onnx, k):
    """FP32 at batch 64 (activations dominate): the liveness estimate within 15 % of ORT's measured peak."""
    est = activation_memory(onnx.load(str(wrn_onnx[k])), batch=64)
    measured = measure_peak(Artifact(wrn_onnx[k], "onnxruntime", "fp32"), batch=64, input_shape=(3, 32, 32))
    assert measured.runtime == "onnxruntime" and len(measured.runs) == 3
    assert not measured.settings["enable_cpu_mem_arena"] and measured.settings["intra_op_num_threads"] == 1
    ratio = measured.bytes / est.runtime_peak_bytes
    assert 0.85 <= ratio <= 1.15, f"wrn-10-{k}: ORT {measured.runs} vs estimate {est.runtime_peak_bytes}"


@needs_proc
def test_openvino_peak_is_its_first_inference(wrn_onnx, tmp_path):
    """OpenVINO allocates on a request's first inference: wrn-10-2 at batch 64 measured 20.6-23.0 MiB against
    an estimate of 20.0 MiB (a second inference rises by nothing)."""
    pytest.importorskip("openvino")
    backend = get_backend("openvino")
    artifact = backend.compile(wrn_onnx[2], targets.load("cpu-openvino"), tmp_path / "wrn.xml")
    est = activation_memory(onnx.load(str(wrn_onnx[2])), batch=64)
    measured = measure_peak(artifact, batch=64, input_shape=(3, 32, 32))
    assert measured.runtime == "openvino" and measured.settings["INFERENCE_NUM_THREADS"] == 1
    assert 0.85 <= measured.bytes / est.runtime_peak_bytes <= 1.3, measured.runs


def test_measure_peak_rejects_a_bad_batch():
    with pytest.raises(EdgeresError, match="batch"):
        measure_peak(Artifact("m.onnx", "onnxruntime", "fp32"), batch=0, input_shape=(3, 32, 32))
