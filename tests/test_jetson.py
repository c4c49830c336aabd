"""Device bundle: build.sh syntax and the trtexec flags it calls per TensorRT version, cache, README."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeres import targets
from edgeres.backends import tensorrt as trt_backend
from edgeres.backends.tensorrt import bundle as jetson
from edgeres.errors import ExportError, TargetError

ORIN_NX = targets.load("jetson-orin-nx")      # 2 DLA cores, 16 GB -> 4096 MiB workspace
ORIN_NANO = targets.load("jetson-orin-nano")  # no DLA, 8 GB -> 2048 MiB workspace
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is needed to run build.sh")

FAKE_TRTEXEC = """#!/usr/bin/env bash
if [ "${1:-}" = "--help" ]; then
    echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_INT:-0}] # trtexec"; exit 0
fi
echo "$*" >> "$FAKE_LOG"
"""


def qdq_model():
    """input -Q/DQ-> Conv(int8 weight) -> Relu -Q/DQ-> GlobalAveragePool -> logits, dynamic batch."""
    w = np.random.default_rng(0).integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q"], "q_in"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["x"], "dq_in"),
        helper.make_node("DequantizeLinear", ["w8", "sw", "zw"], ["w"], "dq_w", axis=0),
        helper.make_node("Conv", ["x", "w"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("QuantizeLinear", ["r", "s2", "zp"], ["q2"], "q_r"),
        helper.make_node("DequantizeLinear", ["q2", "s2", "zp"], ["r2"], "dq_r"),
        helper.make_node("GlobalAveragePool", ["r2"], ["logits"], "gap"),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, dtype=t), n) for n, v, t in [
        ("s", 0.05, np.float32), ("zp", 0, np.int8), ("w8", w, np.int8), ("sw", np.full(4, 0.01), np.float32),
        ("zw", np.zeros(4), np.int8), ("s2", 0.02, np.float32)]]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 1, 1])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def make_bundle(tmp_path, target, precision="int8", name="b"):
    bundle = tmp_path / name
    bundle.mkdir()
    onnx.save(qdq_model(), bundle / "model.onnx")
    written = jetson.write_bundle_extras(bundle, target, onnx_name="model.onnx", precision=precision,
                                         input_shape=(3, 8, 8))
    return bundle, written


def run_build(bundle, tmp_path, version=None, trt_int=None):
    """Run build.sh with a fake trtexec on PATH; return (trtexec argv lines, completed process)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    log = tmp_path / "trtexec.log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_TRT_INT": str(trt_int or 0)}
    if version:
        env["EDGERES_TRT_VERSION"] = version
    proc = subprocess.run([BASH, str(bundle / "build.sh")], env=env, capture_output=True, text=True, timeout=30)
    return [line.split() for line in log.read_text().splitlines()], proc


def test_bundle_files_and_syntax(tmp_path):
    bundle, written = make_bundle(tmp_path, ORIN_NX)
    names = {p.name for p in written}
    assert names == {"build.sh", "build.json", "README.md", "calibration.cache", "model.noqdq.onnx"}
    assert subprocess.run([BASH, "-n", str(bundle / "build.sh")]).returncode == 0
    assert (bundle / "build.sh").stat().st_mode & 0o111
    settings = json.loads((bundle / "build.json").read_text())
    assert settings["target"] == "jetson-orin-nx" and settings["input_shape"] == [1, 3, 8, 8]
    assert settings["workspace_mb"] == 4096 and settings["calibration_cache"] == "calibration.cache"
    header, scales = trt_backend.read_calibration_cache(bundle / "calibration.cache")
    assert header == "TRT-100300-EntropyCalibration2"   # newest TensorRT with DLA on the board (JP 6.x)
    assert scales["input"] == pytest.approx(0.05) and scales["r"] == pytest.approx(0.02)
    noqdq = onnx.load(bundle / "model.noqdq.onnx")
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in noqdq.graph.node}


@pytest.mark.parametrize("version", ["8.5.2", "10.3.0", "10.13.3", "11.4.1"])
def test_build_sh_gpu_line_is_trtexec_command(tmp_path, version):
    """One source of truth: the GPU line build.sh runs equals trtexec_command for that version."""
    bundle, _ = make_bundle(tmp_path, ORIN_NX)
    calls, proc = run_build(bundle, tmp_path, version)
    assert proc.returncode == 0, proc.stderr
    expected = trt_backend.trtexec_command("model.onnx", "model.engine", ORIN_NX, version, precision="int8",
                                           shapes="input:1x3x8x8")
    assert calls[0] == expected[1:]


def test_build_sh_8_5_with_dla(tmp_path):
    bundle, _ = make_bundle(tmp_path, ORIN_NX)
    calls, proc = run_build(bundle, tmp_path, "8.5.2")
    gpu, dla0, dla1 = calls
    assert {"--int8", "--fp16", "--workspace=4096"} <= set(gpu) and "--stronglyTyped" not in gpu
    for core, line in enumerate((dla0, dla1)):
        assert {"--onnx=model.noqdq.onnx", f"--useDLACore={core}", "--allowGPUFallback", "--int8", "--fp16",
                "--calib=calibration.trt.cache", f"--saveEngine=model.dla{core}.engine"} <= set(line)
    device_cache = (bundle / "calibration.trt.cache").read_text().splitlines()
    assert device_cache[0] == trt_backend.calibration_cache_header("8.5.2") == "TRT-8502-EntropyCalibration2"
    assert device_cache[1:] == (bundle / "calibration.cache").read_text().splitlines()[1:]


def test_build_sh_10_3_with_dla(tmp_path):
    bundle, _ = make_bundle(tmp_path, ORIN_NX)
    calls, proc = run_build(bundle, tmp_path, "10.3.0")
    assert len(calls) == 3
    assert {"--int8", "--fp16", "--memPoolSize=workspace:4096M"} <= set(calls[0])
    assert all(f"--useDLACore={i}" in calls[i + 1] for i in range(2))
    assert (bundle / "calibration.trt.cache").read_text().startswith("TRT-100300-EntropyCalibration2\n")


def test_build_sh_10_13_is_strongly_typed_without_dla(tmp_path):
    bundle, _ = make_bundle(tmp_path, ORIN_NX)
    calls, proc = run_build(bundle, tmp_path, "10.13.3")
    assert len(calls) == 1 and "--stronglyTyped" in calls[0]
    assert not {"--int8", "--fp16"} & set(calls[0])
    assert "TensorRT 10.13.3: no DLA engine" in proc.stderr


def test_build_sh_11_has_no_precision_flags(tmp_path):
    bundle, _ = make_bundle(tmp_path, ORIN_NX)
    calls, proc = run_build(bundle, tmp_path, "11.4.1")
    assert proc.returncode == 0 and len(calls) == 1
    assert not {"--int8", "--fp16", "--stronglyTyped"} & set(calls[0])
    assert "--memPoolSize=workspace:4096M" in calls[0]
    assert "not one jetson-orin-nx is known to ship" in proc.stderr   # Orin NX gets no TensorRT 11


def test_build_sh_without_dla_board(tmp_path):
    bundle, written = make_bundle(tmp_path, ORIN_NANO)
    assert {p.name for p in written} == {"build.sh", "build.json", "README.md"}
    calls, proc = run_build(bundle, tmp_path, "10.3.0")
    assert len(calls) == 1 and "--memPoolSize=workspace:2048M" in calls[0]
    assert not any(a.startswith("--useDLACore") for a in calls[0])


def test_build_sh_detects_version_from_trtexec(tmp_path):
    bundle, _ = make_bundle(tmp_path, ORIN_NANO)
    calls, proc = run_build(bundle, tmp_path, trt_int=100300)   # "[TensorRT v100300]"
    assert proc.returncode == 0 and "TensorRT 10.3.0" in proc.stderr
    assert "--memPoolSize=workspace:2048M" in calls[0] and "--int8" in calls[0]
    calls, proc = run_build(bundle, tmp_path, trt_int=8502)
    assert "TensorRT 8.5.2" in proc.stderr and "--workspace=2048" in calls[0]


def test_build_sh_refuses_what_the_version_cannot_do(tmp_path):
    bundle, _ = make_bundle(tmp_path, targets.load("jetson-agx-orin"), precision="fp16")
    calls, proc = run_build(bundle, tmp_path, "11.4.1")
    assert proc.returncode == 1 and calls == [] and "no FP16 flag" in proc.stderr
    calls, proc = run_build(bundle, tmp_path, "ten")
    assert proc.returncode == 1 and "cannot read TensorRT version" in proc.stderr


def test_fp16_dla_bundle_has_no_cache(tmp_path):
    bundle, written = make_bundle(tmp_path, ORIN_NX, precision="fp16")
    assert "calibration.cache" not in {p.name for p in written}
    calls, _ = run_build(bundle, tmp_path, "10.3.0")
    assert len(calls) == 3 and all("--int8" not in c and "--fp16" in c for c in calls)


def test_readme_names_the_steps(tmp_path):
    bundle, _ = make_bundle(tmp_path, ORIN_NX)
    text = (bundle / "README.md").read_text()
    for step in ("./build.sh", "edgeres build BUNDLE", "edgeres bench BUNDLE/model.engine",
                 "edgeres eval BUNDLE/model.engine --data D", "model.noqdq.onnx", "| 6.1 | 10.3.0 |"):
        assert step in text


def test_bad_requests(tmp_path):
    with pytest.raises(TargetError, match="use fp16"):
        make_bundle(tmp_path, targets.load("jetson-nano"), precision="int8", name="nano")
    with pytest.raises(TargetError, match="TensorRT"):
        make_bundle(tmp_path, targets.load("cpu"), name="cpu")
    with pytest.raises(ExportError, match="not found"):
        jetson.write_bundle_extras(tmp_path, ORIN_NX, onnx_name="missing.onnx", precision="int8",
                                   input_shape=(3, 8, 8))
    with pytest.raises(ExportError, match="input shape"):
        jetson.write_bundle_extras(tmp_path / "nano", ORIN_NANO, onnx_name="model.onnx", precision="fp16",
                                   input_shape=(3, 8))
