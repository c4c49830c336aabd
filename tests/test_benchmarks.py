"""benchmarks/: the CPU INT8 comparison script and the rewrite study (tiny models, few runs)."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeres.compress.quantize import QuantizeOptions, ptq
from edgeres.models import create

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bench(request):
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(BENCHMARKS))
    import _common
    import cpu_int8

    request.addfinalizer(mp.undo)
    return cpu_int8, _common


@pytest.fixture(scope="module")
def wrn(bench, tmp_path_factory):
    """A pre-activation WRN (unfoldable BNs) quantized the pipeline's way and with its BNs kept, as CPU INT8 ONNX."""
    _, common = bench
    tmp = tmp_path_factory.mktemp("wrn")
    torch.manual_seed(0)
    model = create("wrn-10-2").eval()
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    qmodel = ptq(model, calib, example_input=X[:1])
    base, _ = common.write_int8_onnx(qmodel, tmp / "int8.onnx", 32)
    kept = ptq(model, calib, example_input=X[:1], options=QuantizeOptions(bn_as_conv=False))
    bn_kept, _ = common.write_int8_onnx(kept, tmp / "bn_kept.onnx", 32)
    return {"qmodel": qmodel, "base": base, "bn_kept": bn_kept, "tmp": tmp}


def test_graph_summary_finds_the_fp32_island_of_kept_bns(bench, wrn):
    _, common = bench
    kept, base = common.graph_summary(wrn["bn_kept"]), common.graph_summary(wrn["base"])
    assert "BatchNormalization" in kept["op_types"] and kept["transposes"] > 2
    assert any("BatchNormalization" in island for island in kept["fp32_islands"]), kept["fp32_islands"]
    assert base["quantized_ops"] >= kept["quantized_ops"] + 3  # wrn-10-2's 3 unfoldable BNs: QLinearConv
    assert "BatchNormalization" not in base["op_types"] and not base["fp32_islands"]
    assert base["transposes"] == 2  # into and out of the channels-last section only
    assert base["op_types"].get("QGemm") == 1  # DQ moved past Flatten: the classifier runs quantized


def test_write_int8_onnx_amx_uses_the_library_rewrite(bench, wrn):
    _, common = bench
    path, applied = common.write_int8_onnx(wrn["qmodel"], wrn["tmp"] / "amx.onnx", 32, amx=True)
    assert applied["amx_convs"] >= 1  # wrn-10-2's 64- and 128-wide 3x3 convs (K >= 256)
    np.testing.assert_array_equal(_run(path, X), _run(wrn["base"], X))  # zero point -1, weights shifted: exact


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


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
    assert "edgeres_int8_proposed" not in keys and set(m["targets"]) == {"edgeres_int8"}
    target = m["targets"]["edgeres_int8"]
    assert set(target) == {"batch1_4x_torch_fp32", "not_slower_than_ort_quantize_static", "vs_ort_quantize_static"}
    per_round = m["ratios"]["edgeres_int8_vs_ort_qs_int8"]["batch1_per_round"]
    assert per_round["rounds"] == 1 and per_round["ci95"][0] <= per_round["median"] <= per_round["ci95"][1]
    assert target["vs_ort_quantize_static"]["batch1"] == per_round["verdict"] in {"faster", "slower", "parity"}


def test_wrn_gap_smoke_run_writes_json(bench, tmp_path):
    import wrn_gap as gap

    out = tmp_path / "gap.json"
    rc = gap.main(["--model", "wrn-10-1", "--eval", "0", "--calib", "16", "--runs", "2", "--threads", "1",
                   "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["bn_as_depthwise"]["replaced"] >= 3 and result["bn_as_depthwise"]["fp32_max_abs_logit_diff"] < 1e-3
    assert {"int8", "int8 BN kept"} <= set(result["graphs"])
    assert result["timing"]["batch1"]["int8"]["speedup_vs_int8"] == 1.0


def test_amx_threshold_smoke_run_counts_rewritten_convs(bench, tmp_path):
    import amx_threshold

    out = tmp_path / "amx.json"
    assert amx_threshold.main(["--model", "wrn-10-1", "--runs", "10", "--calib", "16", "--threads", "1",
                               "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rewritten = result["convs_rewritten"]
    assert rewritten["edgeres, AMX K>=256 N>=64"] >= 1  # wrn-10-1's 64-wide 3x3 convs
    assert rewritten["edgeres, AMX K>=256 N>=128"] == 0  # nothing is 128 wide
    b1 = result["timing"]["batch1"]
    assert b1["quantize_static"]["vs_quantize_static"] == 1.0 and "edgeres, no AMX rewrite" in b1


def test_openvino_vs_nncf_smoke_run_writes_json(bench, tmp_path, data_root):
    pytest.importorskip("openvino")
    import openvino_vs_nncf

    out = tmp_path / "ov.json"
    assert openvino_vs_nncf.main(["--model", "wrn-10-1", "--eval", "0", "--rounds", "2", "--threads", "1",
                                  "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows["OV int8 (NNCF native)"]["vs_nncf_native_b1"]["median"] == 1.0
    ours = rows["OV int8 (edgeres)"]["precision"]
    assert ours["int8_ops"] > 0 and ours["bf16_ops"] == 0
    assert result["machine"]["cores_available"] >= 1 and "openvino" in result["versions"]


def test_loader_224_smoke_counts_images_and_memory(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import loader_224

    for c in ("a", "b"):
        (tmp_path / "t" / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (300 + 10 * i, 200), (80 * i, 40, 200)).save(tmp_path / "t" / "val" / c / f"{i}.jpg")
    row = loader_224.measure(str(tmp_path / "t"), workers=0, batch=4, split="test")
    assert row["images"] == 6 and row["images_per_s"] > 0
    assert row["peak_tree_rss_mb"] >= row["rss_before_mb"] > 0
