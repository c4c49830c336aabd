"""benchmarks/: the CPU INT8 comparison script and the graph rewrites it measures (tiny models, few runs)."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeres.compress.quantize import ptq, strip
from edgeres.export import export_onnx
from edgeres.models import create

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bench(request):
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(BENCHMARKS))
    import cpu_int8
    import wrn_gap

    request.addfinalizer(mp.undo)
    return cpu_int8, wrn_gap


@pytest.fixture(scope="module")
def wrn(bench, tmp_path_factory):
    """A pre-activation WRN (unfoldable BNs) and its INT8 ONNX written the pipeline's way, and with all rewrites."""
    _, gap = bench
    tmp = tmp_path_factory.mktemp("wrn")
    torch.manual_seed(0)
    model = create("wrn-10-2").eval()
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    qmodel = ptq(model, calib, example_input=X[:1])
    base, _ = gap.write_int8_onnx(qmodel, tmp / "int8.onnx", 32)
    raw = export_onnx(strip(qmodel, X[:1]), tmp / "raw.onnx", input_size=32)  # before any flavour
    rewritten, applied = gap.write_int8_onnx(gap.ptq_bn_as_conv(model, calib, example_input=X[:1]),
                                             tmp / "abc.onnx", 32, sink=True, amx=True)
    return {"model": model, "base": base, "raw": raw, "rewritten": rewritten, "applied": applied, "tmp": tmp}


def _run(model_or_path, x):
    if isinstance(model_or_path, onnx.ModelProto):
        model_or_path = model_or_path.SerializeToString()
    sess = ort.InferenceSession(model_or_path if isinstance(model_or_path, bytes) else str(model_or_path),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def test_bn_as_depthwise_is_the_same_function(bench):
    _, gap = bench
    model = create("wrn-10-2").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-2, 2)
        converted, n = gap.bn_as_depthwise(model, X[:1])
        torch.testing.assert_close(converted(X), model(X), rtol=1e-4, atol=1e-4)

    def bns(m):
        return sum(isinstance(k, torch.nn.BatchNorm2d) for k in m.modules())

    assert n == 3  # wrn-10-2: layer2/layer3 bn1 (after an add) and the final bn; the rest fold into a conv
    assert bns(converted) == bns(model) - n


def test_rewrites_remove_fp32_islands_and_transposes(bench, wrn):
    _, gap = bench
    before, after = gap.graph_summary(wrn["base"]), gap.graph_summary(wrn["rewritten"])
    if "BatchNormalization" in before["op_types"]:  # edgeres as it is (no BN-as-conv in compress.quantize yet)
        assert before["fp32_islands"] and before["transposes"] > 2
        assert after["quantized_ops"] >= before["quantized_ops"] + 3  # wrn-10-2's 3 unfoldable BNs: QLinearConv
    assert "BatchNormalization" not in after["op_types"] and not after["fp32_islands"]
    assert after["transposes"] == 2  # into and out of the channels-last section only
    assert after["op_types"].get("QGemm") == 1  # DQ moved past Flatten: the classifier runs quantized


def test_sink_and_amx_rewrites_are_exact(bench, wrn):
    _, gap = bench
    raw = onnx.load(str(wrn["raw"]))
    sunk, moved = gap.sink_dequantize(raw)
    assert moved >= 1  # at least the DQ before Flatten -> Gemm
    np.testing.assert_allclose(_run(sunk, X), _run(raw, X), atol=1e-3)  # QGemm vs FP32 Gemm rounding only
    model = onnx.load(str(wrn["base"]))
    amx, changed = gap.amx_conv_weights(model, min_k=1, min_out=1)  # every conv, whatever the host
    assert changed >= 5
    w = [onnx.numpy_helper.to_array(t) for t in amx.graph.initializer if t.name.endswith("_amx_zero_point")]
    assert w and all(np.all(z == -1) for z in w)
    np.testing.assert_array_equal(_run(amx, X), _run(model, X))


def test_interleaved_times_every_runner(bench):
    cpu_int8, _ = bench
    calls = {"a": 0, "b": 0}

    def runner(key):
        def run(x):
            calls[key] += 1
            return x

        return run

    stats = cpu_int8.interleaved({"a": runner("a"), "b": runner("b")}, 2, 8, runs=6, warmup=1, rounds=3)
    assert {s.runs for s in stats.values()} == {6}
    assert calls == {"a": 1 + 3 + 6, "b": 1 + 3 + 6}  # warm-up, one untimed call per round, timed runs
    assert all(0 < s.p50_ms <= s.p99_ms for s in stats.values())


def test_script_smoke_run_writes_json(bench, tmp_path):
    cpu_int8, _ = bench
    out = tmp_path / "bench.json"
    rc = cpu_int8.main(["--models", "wrn-10-1", "--runs", "2", "--rounds", "1", "--warmup", "0", "--eval", "0",
                        "--calib", "16", "--threads", "1", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    (m,) = result["models"]
    keys = [e["key"] for e in m["engines"]]
    assert keys[:3] == ["torch_fp32", "ort_fp32", "edgeres_int8"] and "ort_qs_int8" in keys
    assert m["ratios"]["vs_torch_fp32"]["torch_fp32"]["batch1_latency"] == 1.0
    assert all(e["batch1"]["p50_ms"] > 0 and e["batch64"]["throughput_ips"] > 0 for e in m["engines"])
    assert set(m["targets"]["edgeres_int8"]) == {"batch1_4x_torch_fp32", "not_slower_than_ort_quantize_static"}
