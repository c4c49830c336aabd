"""The TensorRT-flavoured and CPU-flavoured ONNX of one quantized model agree in top-1 (real data)."""

import onnx
import torch

from edgeres import calibration, checkpoint
from edgeres.backends.ort import OrtBackend, to_cpu_flavour
from edgeres.backends.tensorrt import to_tensorrt_flavour
from edgeres.evaluate import evaluate_session
from edgeres.export import export_onnx, save_onnx


def _session(path):
    from edgeres.backends.base import Artifact

    backend = OrtBackend()
    return backend, backend.load(Artifact(path, "onnxruntime", "int8"))


def test_cpu_and_tensorrt_flavours_agree(resnet20_weights, cifar_train, cifar_test, tmp_path):
    from edgeres.compress import quantize

    model = checkpoint.load_model("resnet20", resnet20_weights)
    spec = calibration.load_calibration("small")
    batches = calibration.calibration_batches(spec, cifar_train, model.cfg.mean, model.cfg.std)
    example = torch.zeros(1, 3, 32, 32)
    q = quantize.strip(quantize.ptq(model, batches, example_input=example), example)
    raw = onnx.load(str(export_onnx(q, tmp_path / "raw.onnx", input_size=32)))
    save_onnx(to_cpu_flavour(raw), tmp_path / "cpu.onnx")
    save_onnx(to_tensorrt_flavour(raw), tmp_path / "trt.onnx")
    test = cifar_test  # the whole split: on a subset, a few flipped images exceed 0.1 pp
    errors = {}
    for name in ("cpu", "trt"):
        backend, session = _session(tmp_path / f"{name}.onnx")
        errors[name] = evaluate_session(backend, session, test, mean=model.cfg.mean, std=model.cfg.std).top1_error
    assert abs(errors["cpu"] - errors["trt"]) <= 0.1, errors
    assert errors["cpu"] < 10.0  # a broken quantization lands far above ResNet-20's 8.27 %
