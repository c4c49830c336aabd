import sys

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("openvino", reason="OpenVINO not installed: pip install 'edgeres[openvino]'")

from edgeres import export as E  # noqa: E402
from edgeres import targets  # noqa: E402
from edgeres.backends import RuntimeOptions, get_backend  # noqa: E402
from edgeres.backends.base import open_artifact  # noqa: E402
from edgeres.backends.openvino import (  # noqa: E402
    INSTALL_HINT,
    OpenVINOBackend,
    bin_path,
    describe_precision,
    ir_precision,
    to_openvino_flavour,  # noqa: E402
)
from edgeres.backends.ort import (
    OrtBackend,  # noqa: E402
    to_cpu_flavour,  # noqa: E402
)
from edgeres.bench import bench_artifact  # noqa: E402
from edgeres.compress.quantize import ptq, strip  # noqa: E402
from edgeres.errors import ExportError, TargetError  # noqa: E402
from edgeres.latency import BenchOptions  # noqa: E402
from edgeres.models import create  # noqa: E402
from edgeres.onnxgraph import attr, qdq_summary  # noqa: E402

X = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def target():
    return targets.load("cpu-openvino")


@pytest.fixture(scope="module")
def files(tmp_path_factory, target):
    """wrn-10-1 as FP32 ONNX and as PTQ INT8 ONNX (OpenVINO flavour), each compiled to IR."""
    tmp = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    model = create("wrn-10-1").eval()
    calib = [torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    stripped = strip(ptq(model, calib, example_input=X[:1]), X[:1])
    raw = onnx.load(str(E.export_onnx(stripped, tmp / "raw.onnx", input_size=32)))
    onnx_files = {
        "fp32": E.export_onnx(model, tmp / "fp32.onnx", input_size=32),
        "int8": E.save_onnx(to_openvino_flavour(raw), tmp / "int8.onnx"),
    }
    backend = OpenVINOBackend()
    arts = {k: backend.compile(p, target, tmp / "ir" / f"{k}.xml") for k, p in onnx_files.items()}
    return {"onnx": onnx_files, "art": arts, "tmp": tmp, "raw": raw}


def _ort_logits(path):
    ort = OrtBackend()
    return ort.run(ort.load(ort.compile(path, None, path)), X.numpy())


def test_target_profile(target):
    assert target.runtime == "openvino" and target.qdq_flavour == "openvino"
    assert target.supports("int8") and target.supports("fp32") and not target.supports("fp16")


def test_registry_returns_the_backend():
    assert isinstance(get_backend("openvino"), OpenVINOBackend)


def test_fp32_matches_onnxruntime(files):
    backend = OpenVINOBackend()
    art = files["art"]["fp32"]
    assert art.runtime == "openvino" and art.precision == "fp32" and art.path.suffix == ".xml"
    assert bin_path(art.path).is_file()
    out = backend.run(backend.load(art, RuntimeOptions(threads=1)), X.numpy())
    assert out.shape == (64, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, _ort_logits(files["onnx"]["fp32"]), rtol=1e-3, atol=1e-4)


def test_int8_agrees_with_onnxruntime_on_the_same_onnx(files):
    backend = OpenVINOBackend()
    art = files["art"]["int8"]
    assert art.precision == "int8" and ir_precision(art.path) == "int8"
    assert ir_precision(files["art"]["fp32"].path) == "fp32"
    session = backend.load(art, RuntimeOptions(threads=1))
    out = backend.run(session, X.numpy())
    ref = _ort_logits(files["onnx"]["int8"])
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_int8_ir_stores_int8_weights(files):
    fp32, int8 = (bin_path(files["art"][k].path).stat().st_size for k in ("fp32", "int8"))
    assert int8 <= 0.35 * fp32
    consts = files["art"]["int8"].meta["constant_bytes"]
    assert consts["i8"] > 5 * consts.get("f32", 0)
    assert files["art"]["int8"].meta["bytes"] == sum(f["bytes"] for f in files["art"]["int8"].meta["files"].values())


def test_precision_report_is_true_fp32_and_int8(files):
    backend = OpenVINOBackend()
    fp32 = backend.load(files["art"]["fp32"]).precision
    assert fp32["inference_precision_hint"] == "f32"
    assert fp32["fp32_ops"] > 0 and fp32["int8_ops"] == 0 and fp32["bf16_ops"] == 0 and fp32["fp16_ops"] == 0
    int8 = backend.load(files["art"]["int8"]).precision
    assert int8["inference_precision_hint"] == "f32" and int8["bf16_ops"] == 0
    assert int8["layers"]["Convolution"] == {"int8": 9}  # wrn-10-1's 9 convs; its 4 unfoldable BNs fused into them
    assert int8["int8_ops"] > int8["fp32_ops"]
    assert files["art"]["int8"].meta["execution"]["int8_ops"] == int8["int8_ops"]


def test_describe_precision_sees_bf16_when_the_plugin_picks_it(files):
    import openvino as ov

    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: the plugin's default is already f32")
    compiled = core.compile_model(str(files["art"]["fp32"].path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    described = describe_precision(compiled)
    assert described["inference_precision_hint"] == "bf16" and described["bf16_ops"] > 0


def test_openvino_flavour_is_uint8_after_relu_only(files):
    rows = qdq_summary(to_openvino_flavour(files["raw"]))
    acts = [r for r in rows if r["op"] == "QuantizeLinear"]
    assert {r["dtype"] for r in acts if r["source_op"] == "Relu"} == {"uint8"}  # ReLU (and pooling of it)
    assert {r["dtype"] for r in acts if r["source_op"] in ("Conv", "Add", "input")} == {"int8"}  # signed stays int8
    assert all(r["zero_points"] == [0] for r in rows)
    assert all(r["dtype"] == "int8" for r in rows if r["weight"])


def test_bench_runs_the_ir(files):
    art = open_artifact(files["art"]["int8"].path)
    assert art.runtime == "openvino"
    result = bench_artifact(art, BenchOptions(batch_sizes=(1, 4), warmup=1, runs=3, threads=1), input_shape=[3, 32, 32])
    assert [r.batch for r in result.rows] == [1, 4] and all(r.p50_ms > 0 for r in result.rows)


def test_compile_errors_leave_nothing_behind(files, target, tmp_path):
    backend = OpenVINOBackend()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot convert"):
        backend.compile(bad, target, tmp_path / "out" / "model.xml")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ExportError, match=r"\.xml"):
        backend.compile(files["onnx"]["fp32"], target, tmp_path / "model.onnx")
    assert not any(p.name.endswith(".tmp") for p in (files["tmp"] / "ir").iterdir())


def test_load_needs_the_bin_and_the_cpu(files, tmp_path):
    backend = OpenVINOBackend()
    lone = tmp_path / "model.xml"
    lone.write_bytes(files["art"]["fp32"].path.read_bytes())
    art = files["art"]["fp32"]
    with pytest.raises(ExportError, match="model.bin is missing"):
        backend.load(type(art)(path=lone, runtime="openvino", precision="fp32"))
    with pytest.raises(ExportError, match="CPU only"):
        backend.load(art, RuntimeOptions(device="cuda"))


def test_missing_openvino_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(TargetError) as info:
        get_backend("openvino")
    assert str(info.value) == INSTALL_HINT == "OpenVINO is not installed: pip install 'edgeres[openvino]'"


from backend_contract import BackendContract  # noqa: E402


class TestOpenVINOContract(BackendContract):
    runtime = "openvino"
    target = "cpu-openvino"
    suffix = ".xml"


def test_openvino_flavour_hands_bns_back_as_mul_add(files):
    """BN-as-depthwise-conv becomes Mul/Add; its input's quantization is dropped only where it fed nothing else."""
    raw = files["raw"]
    cpu = to_cpu_flavour(raw)  # keeps the depthwise convs
    ov_flavour = to_openvino_flavour(raw)
    depthwise = [n for n in cpu.graph.node if n.op_type == "Conv" and attr(n, "group", 1) > 1]
    assert len(depthwise) == 4  # wrn-10-1's unfoldable BNs
    assert not [n for n in ov_flavour.graph.node if n.op_type == "Conv" and attr(n, "group", 1) > 1]
    assert sum(n.op_type == "Mul" for n in ov_flavour.graph.node) == 4
    q = lambda m: sum(n.op_type == "QuantizeLinear" for n in m.graph.node)  # noqa: E731
    assert 0 < q(cpu) - q(ov_flavour) < 4  # single-use sums lose their quantizer, shared ones keep it
    ref = _ort_logits(E.save_onnx(cpu, files["tmp"] / "cpu_flavour.onnx"))  # BNs as int8 depthwise convs
    out = _ort_logits(E.save_onnx(ov_flavour, files["tmp"] / "ov_flavour.onnx"))
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
