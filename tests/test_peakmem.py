import onnx
import pytest
import torch

from edgeres import models, targets
from edgeres.backends import Artifact, get_backend
from edgeres.errors import EdgeresError
from edgeres.export import export_onnx
from edgeres.memory import activation_memory
from edgeres.peakmem import can_measure, measure_peak, peak_rise

pytestmark = pytest.mark.skipif(not can_measure(), reason="the peak RSS is reset through /proc/self/clear_refs (Linux)")
MIB = 2**20


@pytest.fixture(scope="module")
def wrn_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("wrn")
    paths = {}
    for k in (1, 2, 4):
        torch.manual_seed(0)
        paths[k] = export_onnx(models.create(f"wrn-10-{k}"), d / f"wrn-10-{k}.onnx", input_size=32)
    return paths


def test_peak_rise_sees_a_buffer_of_this_process():
    import numpy as np

    rise = peak_rise(lambda: np.ones(32 * MIB, np.uint8))  # touched pages: resident while it lives
    assert 28 * MIB <= rise < 40 * MIB  # (free heap pages already resident may serve a little of it)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_onnxruntime_peak_matches_the_estimate(wrn_onnx, k):
    """FP32 at batch 64 (activations dominate): the liveness estimate within 15 % of ORT's measured peak."""
    est = activation_memory(onnx.load(str(wrn_onnx[k])), batch=64)
    measured = measure_peak(Artifact(wrn_onnx[k], "onnxruntime", "fp32"), batch=64, input_shape=(3, 32, 32))
    assert measured.runtime == "onnxruntime" and len(measured.runs) == 3
    assert not measured.settings["enable_cpu_mem_arena"] and measured.settings["intra_op_num_threads"] == 1
    ratio = measured.bytes / est.runtime_peak_bytes
    assert 0.85 <= ratio <= 1.15, f"wrn-10-{k}: ORT {measured.runs} vs estimate {est.runtime_peak_bytes}"


def test_openvino_peak_is_its_first_inference(wrn_onnx, tmp_path):
    """OpenVINO allocates on a request's first inference: wrn-10-2 at batch 64 measured 20.7-21.0 MiB against
    an estimate of 20.0 MiB (a second inference rises by nothing)."""
    pytest.importorskip("openvino")
    backend = get_backend("openvino")
    artifact = backend.compile(wrn_onnx[2], targets.load("cpu-openvino"), tmp_path / "wrn.xml")
    est = activation_memory(onnx.load(str(wrn_onnx[2])), batch=64)
    measured = measure_peak(artifact, batch=64, input_shape=(3, 32, 32))
    assert measured.runtime == "openvino" and measured.settings["INFERENCE_NUM_THREADS"] == 1
    assert 0.85 <= measured.bytes / est.runtime_peak_bytes <= 1.3, measured.runs


def test_bad_batch_is_one_line():
    with pytest.raises(EdgeresError, match="batch"):
        measure_peak(Artifact("m.onnx", "onnxruntime", "fp32"), batch=0, input_shape=(3, 32, 32))
