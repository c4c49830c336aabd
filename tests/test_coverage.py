import onnx
import pytest

from edgeres import coverage, fallback
from edgeres.backends.base import Artifact
from edgeres.backends.openvino import to_openvino_flavour
from edgeres.backends.ort import to_cpu_flavour
from edgeres.backends.tensorrt import to_tensorrt_flavour
from edgeres.export import save_onnx


def _artifact(model, path):
    save_onnx(model, path)
    return Artifact(path=path, runtime="onnxruntime", precision="int8")


def test_ort_coverage_is_measured_from_the_graph_it_runs(qdq_resnet20, tmp_path):
    from edgeres.backends.ort import OrtBackend

    backend = OrtBackend()
    full = backend.int8_coverage(_artifact(to_cpu_flavour(qdq_resnet20), tmp_path / "a.onnx"))
    assert full.measured and full.int8_mac_share == 1.0 and full.float_layers == [] and full.layers == 20
    node = "/layer2/layer2.1/conv2/Conv"
    mixed = to_cpu_flavour(fallback.keep_float(qdq_resnet20, [node]))
    cov = backend.int8_coverage(_artifact(mixed, tmp_path / "b.onnx"))
    assert "layer2.1.conv2" in cov.float_layers and cov.int8_mac_share < 1.0
    layers = {layer.module: layer.macs for layer in fallback.all_layers(mixed)}
    float_share = sum(layers[m] for m in cov.float_layers) / sum(layers.values())
    assert cov.int8_mac_share == pytest.approx(1 - float_share, abs=1e-4)
    fp32 = backend.int8_coverage(_artifact(onnx.load(str(tmp_path / "b.onnx")), tmp_path / "c.onnx"))
    assert fp32.int8_mac_share == cov.int8_mac_share  # the same file, the same answer


def test_expected_coverage_reads_the_qdq_placement_for_tensorrt(qdq_resnet20):
    node = "/layer3/layer3.0/conv1/Conv"
    trt = fallback.type_fp16(to_tensorrt_flavour(fallback.keep_float(qdq_resnet20, [node])), [node])
    cov = coverage.expected(trt)
    assert not cov.measured and cov.source.startswith("expected")
    assert cov.float_layers == ["layer3.0.conv1"] and cov.int8_layers == 19
    assert coverage.expected(to_tensorrt_flavour(qdq_resnet20)).int8_mac_share == 1.0


def test_openvino_coverage_from_runtime_precisions(qdq_resnet20, tmp_path):
    pytest.importorskip("openvino")
    from edgeres.backends.openvino import OpenVINOBackend
    from edgeres.targets import load

    node = "/layer1/layer1.1/conv1/Conv"
    model = to_openvino_flavour(fallback.keep_float(qdq_resnet20, [node]))
    save_onnx(model, tmp_path / "m.onnx")
    backend = OpenVINOBackend()
    artifact = backend.compile(tmp_path / "m.onnx", load("cpu-openvino"), tmp_path / "m.xml")
    cov = backend.int8_coverage(artifact, backend.load(artifact), fallback.all_layers(model))
    assert cov.measured and "layer1.1.conv1" in cov.float_layers and 0.5 < cov.int8_mac_share < 1.0
