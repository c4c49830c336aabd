import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeres import export as E
from edgeres.backends.ort import amx_conv_weights, to_cpu_flavour
from edgeres.backends.tensorrt import to_tensorrt_flavour
from edgeres.compress.quantize import ptq, strip
from edgeres.errors import ExportError
from edgeres.models import create
from edgeres.onnxgraph import qdq_summary

X = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.fixture(scope="module", params=["resnet20", "wrn-16-1"])
def exported(request, tmp_path_factory):
    """FP32 and Q/DQ ONNX files of one small model, with the stripped torch model for reference."""
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = create(request.param).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]
    stripped = strip(ptq(model, calib, example_input=X[:1]), X[:1])
    fp32 = E.export_onnx(model, tmp / "fp32.onnx", input_size=32)
    qdq = E.export_onnx(stripped, tmp / "qdq.onnx", input_size=32)
    with torch.no_grad():
        ref = stripped(X).numpy()
    return {"tmp": tmp, "fp32": fp32, "qdq": qdq, "ref": ref, "name": request.param}


def _acts(rows):
    return [r for r in rows if not r["weight"] and r["dtype"] not in ("int32",)]


def test_export_has_named_io_dynamic_batch_and_opset(exported):
    model = onnx.load(str(exported["fp32"]))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == 17
    assert _run(exported["fp32"], X[:3]).shape == (3, 10)


def test_unstripped_export_fails_readably(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x.flatten(1)[:, :4].reshape(-1, 2, 2))[0].real

    broken = Broken()
    broken.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ExportError, match="ONNX export failed"):
        E.export_onnx(broken, tmp_path / "x.onnx", input_size=32)
    assert not list(tmp_path.iterdir()), "a failed export leaves no file behind"


def test_cpu_flavour_format(exported):
    cpu = to_cpu_flavour(onnx.load(str(exported["qdq"])))
    rows = qdq_summary(cpu)
    assert not any(r["op"] == "QuantizeLinear" and r["weight"] for r in rows), "weights are stored as int8"
    weights = [r for r in rows if r["weight"] and r["dtype"] == "int8"]
    assert weights and all(r["zero_points"] == [0] and r["axis"] == 0 for r in weights)
    assert all(r["scales"] > 1 for r in weights if r["source_op"] == "input")
    acts = [r for r in _acts(rows) if not r["weight"]]
    assert all(r["dtype"] == "uint8" for r in acts), "activations are uint8 for ORT's QLinear kernels"
    relu_q = [r for r in acts if r["op"] == "QuantizeLinear" and r["source_op"] == "Relu"]
    assert relu_q and all(r["zero_points"] == [0] for r in relu_q)
    # uint8 with zero point 0 only where the input is non-negative (after a ReLU); elsewhere zp 128
    for r in acts:
        if r["op"] == "QuantizeLinear" and r["source_op"] in ("Conv", "Add"):
            assert r["zero_points"] == [128]
        if r["op"] == "QuantizeLinear" and r["zero_points"] == [0]:
            assert r["source_op"] in ("Relu", "GlobalAveragePool", "DequantizeLinear")
    assert any(r["dtype"] == "int32" for r in rows), "conv biases are int32 behind a DequantizeLinear"


def test_cpu_flavour_leaves_ort_no_fp32_island(exported):
    """DQ moved past Slice/Pad/Flatten, WRN's unfoldable BNs quantized as depthwise convs: ORT fuses everything."""
    from edgeres.backends.ort import optimized_op_types

    path = E.save_onnx(to_cpu_flavour(onnx.load(str(exported["qdq"]))), exported["tmp"] / "cpu_fused.onnx")
    ops = optimized_op_types(path)
    assert ops["QGemm"] == 1, ops
    assert not {"Add", "Mul", "BatchNormalization", "Conv", "Gemm"} & set(ops), ops
    assert ops["Transpose"] == 2, ops  # only into and out of the channels-last section


def test_amx_conv_weights_is_exact(exported):
    cpu = to_cpu_flavour(onnx.load(str(exported["qdq"])))
    amx, changed = amx_conv_weights(cpu, min_k=1, min_out=1)  # every conv, whatever this CPU has
    assert changed >= 5
    zero_points = [r for r in qdq_summary(amx) if r["weight"] and r["zero_points"] == [-1]]
    assert len(zero_points) == changed
    a = E.save_onnx(cpu, exported["tmp"] / "cpu_sym.onnx")
    b = E.save_onnx(amx, exported["tmp"] / "cpu_amx.onnx")
    np.testing.assert_array_equal(_run(b, X), _run(a, X))


def test_tensorrt_flavour_format(exported):
    trt = to_tensorrt_flavour(onnx.load(str(exported["qdq"])))
    onnx.checker.check_model(trt)
    rows = qdq_summary(trt)
    assert rows and all(r["dtype"] == "int8" and r["zero_points"] == [0] for r in rows)
    assert all(r["axis"] == 0 for r in rows if r["weight"] and r["scales"] > 1)
    assert not any(r["op"] == "QuantizeLinear" and r["weight"] for r in rows)
    assert {n.domain for n in trt.graph.node} <= {""}
    prod = {o: n for n in trt.graph.node for o in n.output}
    adds = [n for n in trt.graph.node if n.op_type == "Add"]
    assert adds
    for add in adds:  # NVIDIA's residual rule: conv branch raw, identity input through Q/DQ
        kinds = sorted(prod[i].op_type for i in add.input)
        assert kinds == ["Conv", "DequantizeLinear"], kinds


def test_tensorrt_flavour_rejects_uint8(exported):
    cpu = to_cpu_flavour(onnx.load(str(exported["qdq"])))
    with pytest.raises(ExportError, match="signed activations"):
        to_tensorrt_flavour(cpu)


def test_flavours_shrink_and_agree_with_torch(exported):
    tmp, ref = exported["tmp"], exported["ref"]
    fp32_bytes = exported["fp32"].stat().st_size
    qdq = onnx.load(str(exported["qdq"]))
    for flavour in (to_cpu_flavour, to_tensorrt_flavour):
        path = E.save_onnx(flavour(qdq), tmp / f"{flavour.__name__}.onnx")
        assert path.stat().st_size <= 0.32 * fp32_bytes  # wrn-16-1 is tiny: fixed Q/DQ metadata
        out = _run(path, X)
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
        cos = np.dot(out.ravel(), ref.ravel()) / np.linalg.norm(out) / np.linalg.norm(ref)
        assert cos > 0.99


@pytest.mark.slow
@pytest.mark.data
def test_pretrained_resnet20_int8_through_ort_keeps_accuracy(cifar_train, cifar_test, resnet20_weights, tmp_path):
    """akamaster ResNet-20 (91.73% FP32): PTQ on 512 training images, CPU flavour, full test set in ORT."""
    from edgeres import data
    from edgeres.checkpoint import load_model

    model = load_model("resnet20", resnet20_weights).eval()
    mean, std = model.cfg.mean, model.cfg.std
    calib = [x for x, _ in data.batches(data.subset(cifar_train, 512, seed=0), 32, mean=mean, std=std)]
    example = calib[0][:1]
    stripped = strip(ptq(model, calib, example_input=example), example)
    fp32_path = E.export_onnx(model, tmp_path / "fp32.onnx", input_size=32)
    qdq = onnx.load(str(E.export_onnx(stripped, tmp_path / "qdq.onnx", input_size=32)))
    cpu_path = E.save_onnx(to_cpu_flavour(qdq), tmp_path / "cpu.onnx")
    assert cpu_path.stat().st_size <= 0.3 * fp32_path.stat().st_size

    def top1(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        correct = 0
        for x, y in data.batches(cifar_test, 500, mean=mean, std=std):
            correct += int((sess.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).sum())
        return 100.0 * correct / len(cifar_test)

    fp32, int8 = top1(fp32_path), top1(cpu_path)
    assert fp32 == pytest.approx(91.73, abs=0.01)
    assert int8 >= fp32 - 0.5
