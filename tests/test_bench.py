import numpy as np
import pytest
import torch

from edgeres import models
from edgeres.bench import bench_path
from edgeres.errors import EdgeresError
from edgeres.export import export_onnx
from edgeres.latency import BenchOptions, time_runs


def test_time_runs_percentiles_are_ordered():
    stats = time_runs(lambda a: a.sum(), np.ones((4, 8), np.float32), warmup=2, runs=50)
    assert stats.batch == 4 and stats.runs == 50
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.throughput_ips > 0


def test_bench_onnx_artifact(tmp_path):
    path = export_onnx(models.create("wrn-10-1").eval(), tmp_path / "m.onnx", input_size=32)
    res = bench_path(path, BenchOptions(batch_sizes=(1, 8), warmup=2, runs=10, threads=1))
    assert [r.batch for r in res.rows] == [1, 8]
    assert res.threads == 1 and res.precision == "fp32" and res.input_shape == [3, 32, 32]
    assert res.peak_rss_mb > 0 and res.size_mb > 0
    assert res.host["cpu"] and res.host["cpu"] in res.title  # latency means little without the CPU
    assert all(r.throughput_ips == pytest.approx(r.batch * 1e3 / r.p50_ms, rel=1e-3) for r in res.rows)


def test_bad_artifacts(tmp_path):
    with pytest.raises(EdgeresError, match="not found"):
        bench_path(tmp_path / "none.onnx")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(EdgeresError, match="runtime"):
        bench_path(tmp_path / "m.bin")
    with pytest.raises(EdgeresError, match="runs >= 1"):
        time_runs(lambda a: a, torch.zeros(1).numpy(), 0, 0)


def test_precision_comes_from_the_file_not_the_folder(tmp_path):
    """An int8 export folder also holds fp32.onnx: benching it must not say int8."""
    import json

    path = export_onnx(models.create("wrn-10-1").eval(), tmp_path / "fp32.onnx", input_size=32)
    (tmp_path / "manifest.json").write_text(json.dumps({"precision": "int8", "input_shape": ["batch", 3, 32, 32]}))
    res = bench_path(path, BenchOptions(batch_sizes=(1,), warmup=1, runs=2, threads=1))
    assert res.precision == "fp32"


def test_speed_ratio_per_round_with_interval():
    from edgeres.bench import speed_ratio

    ref = [[2.0, 2.0, 2.1], [4.0, 4.1, 4.0], [2.0, 2.2, 2.0]]  # a slow second round hits both alike
    fast = [[1.0, 1.0, 1.1], [2.0, 2.0, 2.1], [1.0, 1.1, 1.0]]
    r = speed_ratio(ref, fast)
    assert r["median"] == 2.0 and r["rounds"] == 3 and r["rounds_at_least_as_fast"] == 1.0
    assert r["ci95"][0] <= 2.0 <= r["ci95"][1]
    assert speed_ratio(fast, ref)["median"] == 0.5
