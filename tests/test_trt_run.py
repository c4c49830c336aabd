"""The Jetson bundle's stand-alone runner (trt_run.py) against a fake `tensorrt` and a host-memory CUDA.

The fake deserializes an "engine" that names an ONNX file and runs it through ONNX Runtime, through the
same tensor-address API (TensorRT >= 8.5) or binding API (older) the real bindings have; "device" memory
is host memory. What is not exercised here: real TensorRT, libcudart and a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeres import artifact_meta, models, targets
from edgeres.backends.tensorrt import bundle as jetson
from edgeres.export import export_onnx
from edgeres.preprocess import Preprocess, eval_array

RUNNER = Path(jetson.__file__).parent / jetson.RUNNER
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _load_runner(path: Path = RUNNER):
    spec = importlib.util.spec_from_file_location("trt_run_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HostCuda:
    """cudaMalloc/cudaMemcpy stand-ins on host memory: pointers are real addresses of numpy buffers."""

    buffers: dict[int, np.ndarray] = {}

    def malloc(self, nbytes):
        buf = np.zeros(nbytes, np.uint8)
        HostCuda.buffers[buf.ctypes.data] = buf
        return buf.ctypes.data

    def free(self, ptr):
        HostCuda.buffers.pop(ptr, None)

    def htod(self, ptr, array):
        array = np.ascontiguousarray(array)
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)

    def dtoh(self, array, ptr):
        ctypes.memmove(array.ctypes.data, ptr, array.nbytes)

    def stream(self):
        return 0

    def synchronize(self, stream):
        return None


def _view(ptr, shape):
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)


def fake_tensorrt(legacy: bool = False) -> types.ModuleType:
    """A `tensorrt` module whose engines are ONNX files run by ONNX Runtime; "broken:" engines scramble logits."""
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "8.2.1" if legacy else "10.3.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.nptype = lambda dt: np.float32

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shape = engine, {}, None

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], self.engine.classes)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            self._run(self.addr["input"], self.addr["logits"])
            return True

        # TensorRT < 8.5
        def set_binding_shape(self, index, shape):
            self.shape = tuple(shape)

        def get_binding_shape(self, index):
            return self.get_tensor_shape("logits")

        def execute_v2(self, bindings):
            self._run(bindings[0], bindings[1])
            return True

        def _run(self, x_ptr, y_ptr):
            x = _view(x_ptr, self.shape).copy()
            y = self.engine.session.run(None, {"input": x})[0]
            if self.engine.broken:
                y = y[:, ::-1] * 3.0  # builds, runs, computes wrongly
            _view(y_ptr, y.shape)[...] = y

    class Engine:
        def __init__(self, onnx_path, broken):
            self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            self.classes = self.session.get_outputs()[0].shape[1]
            self.broken = broken
            if not legacy:
                self.num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("input", "logits")[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float"

        num_bindings = 2

        def get_binding_name(self, i):
            return ("input", "logits")[i]

        def binding_is_input(self, i):
            return i == 0

        def get_binding_dtype(self, i):
            return "float"

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            text = blob.decode(errors="replace")
            if not text.startswith(("onnx:", "broken:")):
                return None  # what TensorRT returns for an engine from another version or GPU
            kind, _, path = text.partition(":")
            return Engine(path, kind == "broken")

    trt.Runtime = Runtime
    return trt


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A Jetson bundle for a random-weight ResNet-20 (FP32 ONNX: a mechanics check) with runner and golden set."""
    torch.manual_seed(0)
    net = models.create("resnet20").eval()
    folder = tmp_path_factory.mktemp("bundle") / "b"
    folder.mkdir()
    export_onnx(net, folder / "model.onnx", input_size=32)
    meta = artifact_meta.for_model(net, precision="fp32", weights={"random_init": True}, data_classes=CIFAR10,
                                   target="jetson-orin-nano")
    artifact_meta.embed_onnx(folder / "model.onnx", meta)
    candidates = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    golden = jetson.golden_set(folder / "model.onnx", candidates, precision="fp32")
    written = jetson.write_bundle_extras(folder, targets.load("jetson-orin-nano"), onnx_name="model.onnx",
                                         precision="fp32", input_shape=(3, 32, 32), meta=meta, golden=golden)
    (folder / "model.engine").write_text(f"onnx:{folder / 'model.onnx'}")
    return folder, written


@pytest.fixture
def runner(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    module = _load_runner(bundle[0] / jetson.RUNNER)
    monkeypatch.setattr(module, "CudaRuntime", HostCuda)
    return module


def test_bundle_carries_runner_golden_set_and_record(bundle):
    folder, written = bundle
    assert {"trt_run.py", "golden.npz", "artifact.json"} <= {p.name for p in written}
    assert (folder / "trt_run.py").read_text() == RUNNER.read_text() and (folder / "trt_run.py").stat().st_mode & 0o111
    record = json.loads((folder / "artifact.json").read_text())
    assert record["classes"] == list(CIFAR10) and record["target"] == "jetson-orin-nano"
    assert record["self_check"]["images"] == jetson.GOLDEN_IMAGES and record["self_check"]["max_abs_logit_diff"] > 0
    with np.load(folder / "golden.npz") as g:
        assert g["inputs"].shape == (8, 3, 32, 32) and g["logits"].shape == (8, 10)
        import onnxruntime as ort

        ref = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"input": g["inputs"]})[0]
        np.testing.assert_allclose(g["logits"], ref, rtol=1e-4, atol=1e-4)  # this exact ONNX's outputs
    readme = (folder / "README.md").read_text()
    assert "python3 trt_run.py --self-check" in readme and "10 classes (airplane, automobile, bird, ...)" in readme


def test_runner_imports_only_what_jetpack_has():
    imported = {line.split()[1].split(".")[0] for line in RUNNER.read_text().splitlines()
                if line.lstrip().startswith(("import ", "from "))}
    assert imported <= {"argparse", "ctypes", "json", "sys", "time", "pathlib", "typing", "numpy", "PIL", "tensorrt"}
    import ast

    ast.parse(RUNNER.read_text(), feature_version=(3, 6))  # JetPack 4.6's Python


def test_self_check_passes_on_a_faithful_engine(runner, bundle, capsys):
    folder, _ = bundle
    assert runner.main(["--bundle", str(folder), "--self-check", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["self_check"]
    assert check["passed"] and check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4


def test_self_check_fails_on_an_engine_that_computes_wrongly(runner, bundle, tmp_path, capsys):
    folder, _ = bundle
    bad = tmp_path / "bad.engine"
    bad.write_text(f"broken:{folder / 'model.onnx'}")
    assert runner.main(["--bundle", str(folder), "--engine", str(bad), "--self-check"]) == 1
    out = capsys.readouterr().out
    assert "self-check FAILED" in out and "max logit difference" in out


def test_runner_works_with_the_pre_8_5_binding_api(bundle, monkeypatch, capsys):
    folder, _ = bundle
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(legacy=True))
    module = _load_runner(folder / jetson.RUNNER)
    monkeypatch.setattr(module, "CudaRuntime", HostCuda)
    assert module.main(["--bundle", str(folder), "--self-check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["self_check"]["passed"]


def test_runner_classifies_images_like_edgeres_predict(runner, bundle, capsys):
    from edgeres import api

    folder, _ = bundle
    root = Path(__import__("os").environ.get("EDGERES_DATA", "")) / "imagenet-sample" / "images"
    if not root.is_dir():
        pytest.skip("imagenet-sample/ not found under EDGERES_DATA")
    images = [str(root / n) for n in ("n02096051_Airedale.JPEG", "n01871265_tusker.JPEG", "n03843555_oil_filter.JPEG")]
    assert runner.main(["--bundle", str(folder), *images, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"]
    ours = api.predict(folder / "model.onnx", images).to_dict()["predictions"]
    assert [[t["class"] for t in p["top"]] for p in got] == [[t["class"] for t in p["top"]] for p in ours]
    pp = Preprocess.from_dict(json.loads((folder / "artifact.json").read_text())["preprocess"])
    for path in images:  # pixel for pixel the same input as edgeres.preprocess
        for record in (pp, Preprocess.imagenet(), Preprocess.imagenet(224, 232, "bicubic")):
            assert np.array_equal(runner.preprocess(path, record.to_dict()), eval_array(path, record))


def test_runner_bench_and_info(runner, bundle, capsys):
    folder, _ = bundle
    assert runner.main(["--bundle", str(folder), "--bench", "--runs", "5", "--warmup", "1", "--info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"]["runs"] == 5 and out["bench"]["p50_ms"] > 0
    assert out["info"]["model"] == "resnet20" and out["info"]["classes"] == 10 and out["info"]["tensorrt_here"]


def test_runner_errors_are_one_line(runner, bundle, tmp_path, capsys):
    folder, _ = bundle
    assert runner.main(["--bundle", str(folder), "--engine", str(tmp_path / "none.engine"), "--self-check"]) == 1
    assert "build it first: ./build.sh" in capsys.readouterr().err
    stale = tmp_path / "stale.engine"
    stale.write_bytes(b"\x00engine from another TensorRT")
    assert runner.main(["--bundle", str(folder), "--engine", str(stale), "--self-check"]) == 1
    assert "rebuild it here with ./build.sh" in capsys.readouterr().err
    assert runner.main(["--bundle", str(tmp_path), "--info"]) == 1
    assert "artifact.json" in capsys.readouterr().err


def test_runner_runs_as_a_script_without_edgeres(bundle, tmp_path):
    """A fresh interpreter in the copied bundle, no edgeres on the path: --info works, no TensorRT is one line."""
    import shutil

    folder, _ = bundle
    away = tmp_path / "device"
    shutil.copytree(folder, away)
    env = {"PATH": "/usr/bin:/bin"}  # -I: no PYTHONPATH (so no edgeres checkout), no user site
    info = subprocess.run([sys.executable, "-I", "trt_run.py", "--info", "--json"], cwd=away, env=env,
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["info"]["first_classes"][0] == "airplane"
    check = subprocess.run([sys.executable, "-I", "trt_run.py", "--self-check"], cwd=away, env=env,
                           capture_output=True, text=True, timeout=60)
    if "tensorrt" not in sys.modules and importlib.util.find_spec("tensorrt") is None:
        assert check.returncode == 1 and check.stderr.startswith("error: TensorRT's Python bindings were not found")


def test_pipeline_bundle_has_golden_outputs_of_its_own_onnx(tmp_path):
    """A synthetic-data export for a Jetson target ships runner, record and golden set (FP16: no calibration,
    to keep the default suite lean; INT8 bundles take the same path)."""
    from edgeres import pipeline
    from edgeres.latency import BenchOptions

    out = tmp_path / "orin"
    pipeline.export("resnet20", data_spec="synthetic", out=out, options=pipeline.ExportOptions(
        target="jetson-orin-nano", fp16=True, eval_limit=64, random_init=True,
        bench=BenchOptions(batch_sizes=(1,), warmup=1, runs=2)))
    record = json.loads((out / "artifact.json").read_text())
    assert record["precision"] == "fp16" and record == {**artifact_meta.read(out / "model.onnx").to_dict(),
                                                         "self_check": record["self_check"]}
    with np.load(out / "golden.npz") as g:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"))
        ref = np.concatenate([session.run(None, {"input": x[None]})[0] for x in g["inputs"]])
        np.testing.assert_array_equal(g["logits"], ref)  # batch 1, as the runner's self-check runs them
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"trt_run.py", "golden.npz", "artifact.json"} <= set(manifest["files"])
    assert onnx.load(str(out / "model.onnx")).metadata_props[0].key == "edgeres"


def test_missing_cuda_runtime_is_one_line(bundle, monkeypatch, capsys):
    """Without libcudart (no JetPack) the runner says so in one line; the ctypes calls themselves need a GPU."""
    folder, _ = bundle
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    module = _load_runner(folder / jetson.RUNNER)
    monkeypatch.setattr(module, "CUDART_NAMES", ("libcudart-does-not-exist.so",))
    (folder / "model.engine").write_text(f"onnx:{folder / 'model.onnx'}")
    assert module.main(["--bundle", str(folder), "--self-check"]) == 1
    assert capsys.readouterr().err.startswith("error: the CUDA runtime (libcudart.so) was not found")
