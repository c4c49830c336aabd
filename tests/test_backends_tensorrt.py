"""TensorRT backend: command lines per version, calibration cache format, Q/DQ stripping, fingerprints.

Building and running engines needs TensorRT and a GPU: those tests carry the gpu marker.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeres import targets
from edgeres.backends import tensorrt as trt_backend
from edgeres.backends.tensorrt import DeviceInfo, trtexec_command
from edgeres.backends.tensorrt import engine as trt_engine
from edgeres.errors import EdgeresError, TargetError

ORIN_NANO = targets.load("jetson-orin-nano")   # no DLA, 8 GB
ORIN_NX = targets.load("jetson-orin-nx")       # 2 DLA cores, 16 GB
AGX_ORIN = targets.load("jetson-agx-orin")     # 2 DLA cores, TensorRT up to 11.4.1
NO_TRT = "TensorRT not found: run this on the device (JetPack ships it)"


def init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qdq_conv_model(*, act_dtype=np.int8, s_in=0.05, s_r=0.05, dynamic_batch=True):
    """input -Q/DQ-> Conv(Q/DQ fp32 weight, per channel) -> Relu -Q/DQ-> GlobalAveragePool -> Flatten."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s_in", "zp_in"], ["q_in"], "q_in"),
        helper.make_node("DequantizeLinear", ["q_in", "s_in", "zp_in"], ["x_dq"], "dq_in"),
        helper.make_node("QuantizeLinear", ["w", "s_w", "zp_w"], ["w_q"], "q_w", axis=0),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["w_dq"], "dq_w", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("QuantizeLinear", ["r", "s_r", "zp_r"], ["q_r"], "q_r"),
        helper.make_node("DequantizeLinear", ["q_r", "s_r", "zp_r"], ["r_dq"], "dq_r"),
        helper.make_node("GlobalAveragePool", ["r_dq"], ["g"], "gap"),
        helper.make_node("Flatten", ["g"], ["logits"], "flatten"),
    ]
    inits = [
        init("s_in", s_in), init("zp_in", 0, np.int8), init("w", w),
        init("s_w", np.abs(w).reshape(4, -1).max(1) / 127), init("zp_w", np.zeros(4), np.int8),
        init("b", np.zeros(4)), init("s_r", s_r), init("zp_r", 0, act_dtype),
    ]
    batch = "batch" if dynamic_batch else 1
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ort_run(model, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


# --- trtexec command lines ---------------------------------------------------------------------------


def cmd(version, target=ORIN_NANO, **kw):
    kw.setdefault("precision", "int8")
    return trtexec_command("m.onnx", "m.engine", target, version, **kw)


def test_trtexec_8_5_int8_uses_int8_fp16_and_workspace():
    assert cmd("8.5.2") == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--int8", "--fp16",
                            "--workspace=2048"]


def test_trtexec_10_3_int8_uses_mempoolsize():
    assert cmd("10.3.0") == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--int8", "--fp16",
                             "--memPoolSize=workspace:2048M"]


def test_trtexec_10_13_int8_is_strongly_typed():
    c = cmd("10.13.3")
    assert "--stronglyTyped" in c and "--int8" not in c and "--fp16" not in c


def test_trtexec_11_has_no_precision_flags():
    c = cmd("11.4.1", AGX_ORIN)
    assert c == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--memPoolSize=workspace:16384M"]


def test_trtexec_fp16_and_fp32():
    assert "--fp16" in cmd("10.13.3", precision="fp16") and "--int8" not in cmd("8.5.2", precision="fp16")
    assert not {"--int8", "--fp16", "--stronglyTyped"} & set(cmd("10.3.0", precision="fp32"))
    with pytest.raises(TargetError, match="no FP16 flag"):
        cmd("11.0", AGX_ORIN, precision="fp16")


@pytest.mark.parametrize("version", ["8.5.2", "10.3.0"])
def test_trtexec_dla_int8_uses_calibration_cache(version):
    c = cmd(version, ORIN_NX, dla_core=1, calib_cache="calibration.cache")
    assert {"--useDLACore=1", "--allowGPUFallback", "--int8", "--fp16", "--calib=calibration.cache"} <= set(c)
    assert "--stronglyTyped" not in c
    fp16 = cmd(version, ORIN_NX, dla_core=0, precision="fp16")
    assert {"--useDLACore=0", "--allowGPUFallback", "--fp16"} <= set(fp16) and "--int8" not in fp16


@pytest.mark.parametrize("version", ["10.13.3", "11.4.1"])
def test_trtexec_dla_on_newer_tensorrt_is_refused(version):
    with pytest.raises(TargetError, match="no DLA build path"):
        cmd(version, AGX_ORIN, dla_core=0, calib_cache="calibration.cache")


def test_dla_errors_are_clear():
    with pytest.raises(TargetError, match="has no DLA"):
        cmd("10.3.0", ORIN_NANO, dla_core=0, calib_cache="c")
    with pytest.raises(TargetError, match="DLA core 2 does not exist"):
        cmd("10.3.0", ORIN_NX, dla_core=2, calib_cache="c")
    with pytest.raises(TargetError, match="needs a calibration cache"):
        cmd("10.3.0", ORIN_NX, dla_core=0)
    with pytest.raises(TargetError, match="fp16 or int8 only"):
        cmd("10.3.0", ORIN_NX, dla_core=0, precision="fp32")
    with pytest.raises(TargetError, match="only for DLA builds"):
        cmd("10.3.0", ORIN_NX, calib_cache="c")


def test_int8_on_nano_and_non_tensorrt_targets_are_refused():
    with pytest.raises(TargetError, match="use fp16"):
        cmd("8.2.1", targets.load("jetson-nano"))
    with pytest.raises(TargetError, match="not TensorRT"):
        cmd("10.3.0", targets.load("cpu"))
    with pytest.raises(TargetError, match="not a TensorRT version"):
        cmd("ten")


def test_workspace_is_capped_to_the_board():
    assert "--memPoolSize=workspace:2048M" in cmd("10.3.0", workspace_mb=100_000)   # 8 GB / 4
    assert "--memPoolSize=workspace:512M" in cmd("10.3.0", workspace_mb=512)
    gpu = targets.load("gpu-tensorrt")   # memory unknown: only what is asked
    assert not any(a.startswith("--memPoolSize") for a in cmd("10.3.0", gpu))
    assert "--workspace=8000" in cmd("8.6.1", gpu, workspace_mb=8000)
    with pytest.raises(TargetError, match="positive"):
        cmd("10.3.0", workspace_mb=0)


# --- calibration cache -------------------------------------------------------------------------------


def test_calibration_cache_header_follows_tensorrt_version():
    assert trt_backend.calibration_cache_header("8.5.2") == "TRT-8502-EntropyCalibration2"
    assert trt_backend.calibration_cache_header("8.2.1.8") == "TRT-8201-EntropyCalibration2"
    assert trt_backend.calibration_cache_header("10.3.0") == "TRT-100300-EntropyCalibration2"
    assert trt_backend.calibration_cache_header((8, 6)) == "TRT-8600-EntropyCalibration2"


def test_calibration_cache_format(tmp_path):
    path = trt_backend.write_calibration_cache(tmp_path / "c.cache", {"input": 1.0, "r": 0.125, "x": 2 / 127},
                                               "8.5.2")
    lines = path.read_text().splitlines()
    assert lines[:3] == ["TRT-8502-EntropyCalibration2", "input: 3f800000", "r: 3e000000"]
    # read back the way NVIDIA's Q/DQ-Translator reads caches
    name, hexval = lines[3].split(": ")
    assert name == "x" and struct.unpack("!f", bytes.fromhex(hexval))[0] == pytest.approx(2 / 127)
    header, scales = trt_backend.read_calibration_cache(path)
    assert header == lines[0] and scales["r"] == 0.125
    retargeted = trt_backend.retarget_calibration_cache(path.read_text(), "10.3.0")
    assert retargeted.splitlines() == ["TRT-100300-EntropyCalibration2", *lines[1:]]


def test_calibration_cache_rejects_bad_scales(tmp_path):
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(EdgeresError, match="positive"):
            trt_backend.write_calibration_cache(tmp_path / "c.cache", {"t": bad}, "8.5.2")
    assert not (tmp_path / "c.cache").exists()


# --- Q/DQ -> Q/DQ-free + scales ----------------------------------------------------------------------


def test_strip_qdq_removes_qdq_and_folds_quantized_weights():
    model = qdq_conv_model()
    stripped = trt_backend.strip_qdq(model)
    assert [n.op_type for n in stripped.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten"]
    assert list(stripped.graph.node[0].input) == ["input", "w_dq", "b"]
    inits = {i.name: numpy_helper.to_array(i) for i in stripped.graph.initializer}
    assert set(inits) == {"w_dq", "b"}
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    s = np.abs(w).reshape(4, -1).max(1) / 127
    expected = np.clip(np.rint(w / s[:, None, None, None]), -128, 127) * s[:, None, None, None]
    np.testing.assert_allclose(inits["w_dq"], expected, rtol=1e-6)
    assert not np.allclose(inits["w_dq"], w)          # the weights are the quantized ones
    assert len(model.graph.node) == 10                 # the input model is untouched
    x = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 8, 8)).astype(np.float32)
    with_qdq, without = ort_run(model, x), ort_run(stripped, x)
    assert with_qdq.shape == without.shape == (2, 4)
    np.testing.assert_allclose(with_qdq, without, atol=0.05)   # only activation rounding differs


def test_strip_qdq_drops_what_only_fed_the_qdq():
    model = qdq_conv_model()
    zp = next(i for i in model.graph.initializer if i.name == "zp_in")
    zp.name = "zp_in_const"
    model.graph.node.insert(0, helper.make_node("Identity", ["zp_in_const"], ["zp_in"], "zp_identity"))
    stripped = trt_backend.strip_qdq(model)
    assert "Identity" not in {n.op_type for n in stripped.graph.node}
    assert {i.name for i in stripped.graph.initializer} == {"w_dq", "b"}


def test_scales_from_qdq_onnx_map_to_stripped_tensor_names():
    scales = trt_backend.scales_from_qdq_onnx(qdq_conv_model(s_in=0.04, s_r=0.02))
    assert scales["input"] == pytest.approx(0.04)
    assert scales["r"] == pytest.approx(0.02)
    assert scales["c"] == pytest.approx(0.02)          # through Relu, as the Q/DQ-Translator does
    assert "w" not in scales and "x_dq" not in scales
    stripped_tensors = {t for n in trt_backend.strip_qdq(qdq_conv_model()).graph.node for t in [*n.input, *n.output]}
    assert set(scales) <= stripped_tensors


def test_uint8_activation_scales_become_symmetric_int8_scales():
    scales = trt_backend.scales_from_qdq_onnx(qdq_conv_model(act_dtype=np.uint8, s_r=0.01))
    assert scales["r"] == pytest.approx(0.01 * 255 / 127)


# --- fingerprints, missing TensorRT, ensure_engine ---------------------------------------------------

ORIN_DEVICE = DeviceInfo(gpu_name="Orin", compute_capability="8.7", tensorrt_version="10.3.0")


def test_fingerprint_matches():
    meta = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0", "onnx_sha256": "x"}
    assert trt_backend.fingerprint_matches(meta, ORIN_DEVICE)
    other = {**meta, "tensorrt_version": "8.5.2.2"}
    assert not trt_backend.fingerprint_matches(other, ORIN_DEVICE)
    assert trt_backend.fingerprint_mismatch(other, ORIN_DEVICE) == ["TensorRT 8.5.2.2 (engine) vs 10.3.0 (here)"]
    assert len(trt_backend.fingerprint_mismatch({}, ORIN_DEVICE)) == 3


def test_missing_tensorrt_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # makes `import tensorrt` fail
    for call in (trt_backend.import_tensorrt, trt_backend.detect_device,
                 lambda: trt_backend.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", ORIN_NANO),
                 lambda: trt_backend.TensorRTBackend().compile(tmp_path / "m.onnx", ORIN_NANO, tmp_path)):
        with pytest.raises(EdgeresError) as err:
            call()
        assert str(err.value) == NO_TRT


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """A bundle with build.json and an ONNX; build_engine and detect_device replaced by fakes."""
    onnx.save(qdq_conv_model(), tmp_path / "model.onnx")
    settings = {"target": "jetson-orin-nano", "precision": "int8", "onnx": "model.onnx", "onnx_noqdq": None,
                "calibration_cache": None, "workspace_mb": 2048}
    (tmp_path / "build.json").write_text(json.dumps(settings))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "edgeres-export/1"}))  # edgeres made it
    builds = []

    def fake_build(onnx_path, out, target, **kw):
        builds.append((onnx_path.name, out.name, target.name, kw))
        out.write_bytes(b"engine")
        meta = {**ORIN_DEVICE.__dict__, "onnx_sha256": trt_backend.sha256sum(onnx_path)}
        trt_backend.engine_meta_path(out).write_text(json.dumps(meta))
        return out

    monkeypatch.setattr(trt_engine, "build_engine", fake_build)
    monkeypatch.setattr(trt_engine, "detect_device", lambda: ORIN_DEVICE)
    return tmp_path, builds


def test_ensure_engine_builds_then_reuses(bundle, capsys):
    path, builds = bundle
    engine = trt_backend.ensure_engine(path)
    assert engine == path / "model.engine" and len(builds) == 1
    assert builds[0][:3] == ("model.onnx", "model.engine", "jetson-orin-nano")
    assert builds[0][3]["precision"] == "int8" and builds[0][3]["workspace_mb"] == 2048
    assert trt_backend.ensure_engine(path) == engine and len(builds) == 1   # fingerprint matches: reused


def test_ensure_engine_rebuilds_on_mismatch(bundle, capsys):
    path, builds = bundle
    engine = trt_backend.ensure_engine(path)
    meta = json.loads(trt_backend.engine_meta_path(engine).read_text())
    trt_backend.engine_meta_path(engine).write_text(json.dumps({**meta, "tensorrt_version": "8.5.2"}))
    trt_backend.ensure_engine(path)
    assert len(builds) == 2
    assert "TensorRT 8.5.2 (engine) vs 10.3.0 (here)" in capsys.readouterr().err


def test_ensure_engine_needs_build_settings(tmp_path):
    with pytest.raises(EdgeresError, match="no build.json"):
        trt_backend.ensure_engine(tmp_path)


# --- on a GPU with TensorRT --------------------------------------------------------------------------


@pytest.mark.gpu
def test_build_and_run_engine_on_gpu(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT is not installed (it comes with JetPack or NVIDIA's wheels)")
    model = qdq_conv_model(dynamic_batch=False)
    onnx.save(model, tmp_path / "m.onnx")
    backend = trt_backend.TensorRTBackend(workspace_mb=256)
    artifact = backend.compile(tmp_path / "m.onnx", targets.load("gpu-tensorrt"), tmp_path)
    assert artifact.precision == "int8" and artifact.meta["onnx_sha256"]
    session = backend.load(artifact)
    x = np.random.default_rng(1).uniform(-1, 1, size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(backend.run(session, x), ort_run(model, x), atol=0.05)


from backend_contract import BackendContract  # noqa: E402


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and an NVIDIA GPU")
class TestTensorRTContract(BackendContract):
    runtime = "tensorrt"
    target = "gpu-tensorrt"
    suffix = ".engine"
    precisions = ("fp16", "fp32")  # an FP32 ONNX builds as FP16 where the GPU has it
    atol = 5e-2
