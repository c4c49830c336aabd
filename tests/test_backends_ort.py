import numpy as np
import onnx
import pytest
import torch

from edgeres import export as E
from edgeres.backends import Artifact, RuntimeOptions, get_backend, list_backends
from edgeres.backends.ort import OrtBackend, optimized_op_types, precision_of, to_cpu_flavour
from edgeres.backends.tensorrt import to_tensorrt_flavour
from edgeres.compress.quantize import ptq, strip
from edgeres.errors import ExportError, TargetError
from edgeres.models import create

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))


class _Target:
    name = "cpu"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ort")
    torch.manual_seed(0)
    model = create("resnet20").eval()
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    stripped = strip(ptq(model, calib, example_input=X[:1]), X[:1])
    fp32 = E.export_onnx(model, tmp / "fp32.onnx", input_size=32)
    qdq = onnx.load(str(E.export_onnx(stripped, tmp / "qdq.onnx", input_size=32)))
    with torch.no_grad():
        ref = stripped(X).numpy()
    return {
        "fp32": fp32,
        "cpu": E.save_onnx(to_cpu_flavour(qdq), tmp / "cpu.onnx"),
        "trt": E.save_onnx(to_tensorrt_flavour(qdq), tmp / "trt.onnx"),
        "ref": ref,
        "tmp": tmp,
    }


def test_registry():
    assert {"onnxruntime", "tensorrt", "openvino"} <= set(list_backends())
    assert isinstance(get_backend("onnxruntime"), OrtBackend)
    with pytest.raises(TargetError, match="unknown runtime"):
        get_backend("tflite")


def test_compile_load_run(files):
    backend = get_backend("onnxruntime")
    art = backend.compile(files["cpu"], _Target(), files["tmp"] / "out" / "model.onnx")
    assert art.path.is_file() and art.runtime == "onnxruntime" and art.precision == "int8"
    assert art.meta["qlinear_ops"] > 0 and art.meta["bytes"] == art.path.stat().st_size
    session = backend.load(art, RuntimeOptions(threads=1))
    out = backend.run(session, X.numpy())
    assert out.shape == (8, 10) and out.dtype == np.float32
    assert (out.argmax(1) == files["ref"].argmax(1)).mean() >= 0.85
    with pytest.raises(ExportError, match="CPU only"):
        backend.load(art, RuntimeOptions(device="cuda"))


def test_precision_detection(files):
    assert precision_of(files["fp32"]) == "fp32"
    assert precision_of(files["trt"]) == "int8"


def test_cpu_flavour_fuses_into_qlinear_kernels(files):
    ops = optimized_op_types(files["cpu"])
    assert ops["QLinearConv"] == 19  # every conv of resnet20
    assert ops["QLinearAdd"] >= 6 and ops["QLinearGlobalAveragePool"] == 1
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0


def test_tensorrt_flavour_stays_unfused_on_cpu(files):
    # All-signed Q/DQ is what TensorRT wants; ORT's CPU kernels mostly leave it as float convs.
    ops = optimized_op_types(files["trt"])
    assert ops["QLinearConv"] < 19


def test_compile_rejects_a_broken_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot load"):
        OrtBackend().compile(bad, _Target(), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_artifact_is_frozen(files):
    art = Artifact(path=files["cpu"], runtime="onnxruntime", precision="int8")
    with pytest.raises(AttributeError):
        art.precision = "fp32"


from backend_contract import BackendContract  # noqa: E402


class TestOrtContract(BackendContract):
    runtime = "onnxruntime"
    target = "cpu"
    suffix = ".onnx"
