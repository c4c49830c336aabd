import os

import pytest

from edgeres import models
from edgeres.backends.base import Artifact
from edgeres.errors import EdgeresError
from edgeres.export import export_onnx
from edgeres.latency import BenchOptions, Worker, measure, measure_here

FAST = BenchOptions(batch_sizes=(1, 3), warmup=2, runs=20, threads=1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = export_onnx(models.create("wrn-10-1").eval(), tmp_path_factory.mktemp("lat") / "m.onnx", input_size=32)
    return Artifact(path, "onnxruntime", "fp32")


def test_measures_each_requested_batch_in_a_spawned_worker(artifact):
    m = measure(artifact, FAST, (3, 32, 32))
    assert [r.batch for r in m.rows] == [1, 3] and [r.runs for r in m.rows] == [20, 20]
    assert m.fresh_process and m.worker_pid != os.getpid()
    assert 0 < m.rows[0].p50_ms <= m.rows[0].p99_ms and m.peak_rss_mb > 0


def test_one_worker_serves_several_measurements(artifact):
    with Worker() as w:
        a, b = w.measure(artifact, FAST, (3, 32, 32)), w.measure(artifact, FAST, (3, 32, 32))
    assert a.worker_pid == b.worker_pid != os.getpid()


def test_worker_starts_fresh_not_forked(artifact, monkeypatch):
    """What this process changed does not reach the worker: it is spawned and imports everything anew."""
    import edgeres.latency

    def broken(*a, **k):
        raise RuntimeError("state of the calling process")

    monkeypatch.setattr(edgeres.latency, "time_runs", broken)
    with pytest.raises(RuntimeError, match="calling process"):
        measure_here(artifact, FAST, (3, 32, 32))
    assert measure(artifact, FAST, (3, 32, 32)).rows[0].p50_ms > 0


def test_worker_errors_arrive_as_edgeres_errors(artifact):
    with pytest.raises(EdgeresError, match="batch sizes must be >= 1"):
        measure(artifact, BenchOptions(batch_sizes=(0,)), (3, 32, 32))
