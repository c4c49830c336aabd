import json

import pytest
import torch

from edgeres import models
from edgeres.errors import EdgeresError, TargetError
from edgeres.fit import (
    MIB,
    PUBLISHED_ERRORS,
    SCHEMA,
    Candidate,
    ExpectedError,
    FitOptions,
    Latency,
    expected_error,
    fit_wrn,
    pick,
    read_runs,
)
from edgeres.latency import BenchOptions


def _cand(width, total_mib, *, latency=None, error=None, budget=10.0, limit=None, prune=0.0):
    total = int(total_mib * MIB)
    lat = Latency(latency, "estimate" if latency is not None else "unknown", "test")
    return Candidate(
        model=f"wrn-16-{width}", width=width, prune=prune, params=width * 1000 - int(prune * 100), macs=width,
        weight_bytes=total // 2, activation_bytes=total - total // 2, activation_unfused_bytes=total,
        latency=lat, expected_error=ExpectedError(error, "published" if error is not None else "unknown"),
        fits_memory=total <= budget * MIB,
        fits_latency=None if limit is None else (latency is not None and latency <= limit),
    )


def test_pick_nothing_fits():
    chosen, reason = pick([_cand(1, 3, budget=2), _cand(2, 5, budget=2)])
    assert chosen is None
    assert "nothing fits" in reason and "wrn-16-1" in reason


def test_pick_everything_fits_takes_the_widest():
    cands = [_cand(k, k) for k in (1, 2, 3)]
    chosen, _ = pick(cands)
    assert chosen is cands[-1]


def test_pick_known_errors_take_the_lowest():
    cands = [_cand(1, 1, error=6.0), _cand(2, 2, error=5.0), _cand(3, 3, error=5.5)]
    chosen, reason = pick(cands)
    assert chosen is cands[1]
    assert "lowest expected error" in reason


def test_pick_latency_binds_before_memory():
    cands = [_cand(k, k, latency=k * 1.0, limit=2.5) for k in (1, 2, 3, 4)]
    assert all(c.fits_memory for c in cands)
    chosen, reason = pick(cands)
    assert chosen is cands[1]
    assert "latency binds" in reason


def test_pick_nothing_meets_the_latency_limit():
    chosen, reason = pick([_cand(1, 1, latency=5.0, limit=1.0), _cand(2, 2, latency=None, limit=1.0)])
    assert chosen is None
    assert "latency" in reason


def test_pick_unpruned_before_pruned_at_equal_width():
    cands = [_cand(2, 2), _cand(2, 1.5, prune=0.5)]
    assert pick(cands)[0] is cands[0]


def test_published_errors_only_where_cited():
    assert PUBLISHED_ERRORS[("cifar10", 28, 10)] == 4.00
    e = expected_error("wrn-28-10", 28, 10, None, "cifar10", [])
    assert (e.top1_error, e.source) == (4.00, "published")
    assert "1605.07146" in e.ref
    assert expected_error("wrn-16-4", 16, 4, None, "cifar10", []).source == "unknown"
    assert expected_error("wrn-28-10", 28, 10, '{"pruned": 1}', "cifar10", []).source == "unknown"


def _fake_run(folder, model_name, accs, data_name):
    from edgeres.checkpoint import checkpoint_dict, save_checkpoint

    folder.mkdir(parents=True)
    net = models.create(model_name)
    save_checkpoint(folder / "best.pt", net)
    (folder / "history.json").write_text(json.dumps(
        [{"epoch": i + 1, "test": {"top1_accuracy": a}} for i, a in enumerate(accs)]))
    torch.save({**checkpoint_dict(net), "data": {"name": data_name}}, folder / "last.pt")


def test_runs_give_the_best_recorded_error(tmp_path):
    _fake_run(tmp_path / "a", "wrn-16-1", [80.0, 91.5, 90.0], "cifar10")
    _fake_run(tmp_path / "b", "wrn-16-1", [92.5], "cifar10")
    _fake_run(tmp_path / "c", "wrn-16-2", [99.0], "synthetic")
    runs, notes = read_runs(tmp_path)
    assert sorted(r.error for r in runs) == [7.5, 8.5]
    assert any("synthetic" in n for n in notes)
    e = expected_error("wrn-16-1", 16, 1, None, "cifar10", runs)
    assert e.source == "runs" and e.top1_error == pytest.approx(8.0)
    assert expected_error("wrn-16-2", 16, 2, None, "cifar10", runs).source == "unknown"
    with pytest.raises(EdgeresError, match="--runs"):
        read_runs(tmp_path / "missing")


@pytest.fixture(scope="module")
def jetson_report():
    """The issue's "done when": wrn depth 16, 2 MB, Jetson Orin Nano, INT8."""
    return fit_wrn(FitOptions(depth=16, budget_mb=2, target="jetson-orin-nano", precision="int8"))


def test_done_when_pick_fits_and_next_width_does_not(jetson_report):
    r = jetson_report
    p = r.pick
    assert p is not None and p.fits
    assert p.weight_bytes + p.activation_bytes <= 2 * MIB
    wider = [c for c in r.candidates if c.width == p.width + 1]
    assert wider and not wider[0].fits_memory and wider[0].total_bytes > 2 * MIB
    assert r.candidates[-1] is wider[0]  # the search stops at the first width where nothing fits
    widths = [c.width for c in r.candidates]
    assert widths == list(range(1, p.width + 2))
    assert all(c.latency.source == "estimate" for c in r.candidates)
    assert all(c.expected_error.source == "unknown" for c in r.candidates)  # no published WRN-16-k<=4 figures
    cols, rows = r.table_rows()
    assert "latency ms (estimate)" in cols
    assert sum("pick" in str(row[-1]) for row in rows) == 1


def test_json_schema(jetson_report):
    d = json.loads(json.dumps(jetson_report.to_dict()))
    assert d["schema"] == SCHEMA
    for key, kind in [("depth", int), ("target", str), ("precision", str), ("batch", int), ("budget_mb", float),
                      ("mb_bytes", int), ("candidates", list), ("pick", dict), ("pick_reason", str),
                      ("stop_reason", str), ("memory_model", dict), ("published_errors", dict), ("notes", list)]:
        assert isinstance(d[key], kind), key
    assert d["latency_source"] == "estimate"
    for c in d["candidates"]:
        assert set(c) >= {"model", "width", "prune", "params", "macs", "weight_bytes", "activation_bytes",
                          "total_bytes", "latency", "expected_error", "fits_memory", "fits_latency", "fits"}
        assert c["total_bytes"] == c["weight_bytes"] + c["activation_bytes"]
        assert c["latency"]["source"] in ("measured", "estimate", "unknown")
        assert c["expected_error"]["source"] in ("runs", "published", "unknown")
        assert (c["expected_error"]["top1_error"] is None) == (c["expected_error"]["source"] == "unknown")
    assert d["pick"]["model"] == jetson_report.pick.model


def test_plot_writes_a_png(jetson_report, tmp_path):
    path = jetson_report.plot(tmp_path / "fit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_limit_binds_on_the_roofline():
    r = fit_wrn(FitOptions(depth=10, budget_mb=64, target="jetson-orin-nano", precision="int8", latency_ms=0.04,
                           max_width=4))
    assert r.pick is not None and r.pick.width == 1
    assert r.candidates[1].fits_memory and r.candidates[1].fits_latency is False
    assert "latency binds" in r.pick_reason


def test_cpu_latency_is_measured_and_pruning_adds_candidates():
    r = fit_wrn(FitOptions(depth=10, budget_mb=0.6, target="cpu", precision="fp32", prune=(0.5,),
                           bench=BenchOptions(batch_sizes=(1,), warmup=1, runs=3)))
    assert [(c.width, c.prune) for c in r.candidates][:2] == [(1, 0.0), (1, 0.5)]
    assert all(c.latency.source == "measured" and c.latency.ms > 0 for c in r.candidates)
    pruned = r.candidates[1]
    assert pruned.params < r.candidates[0].params and pruned.weight_bytes == 4 * pruned.params
    assert r.pick is not None and r.pick.total_bytes <= 0.6 * MIB


def test_bad_input():
    with pytest.raises(EdgeresError, match="6n\\+4"):
        fit_wrn(FitOptions(depth=12, budget_mb=1, target="jetson-orin-nano"))
    with pytest.raises(EdgeresError, match="budget"):
        fit_wrn(FitOptions(depth=16, budget_mb=-1, target="jetson-orin-nano"))
    with pytest.raises(TargetError, match="fp16"):
        fit_wrn(FitOptions(depth=16, budget_mb=1, target="cpu", precision="fp16"))
    with pytest.raises(EdgeresError, match="--prune"):
        fit_wrn(FitOptions(depth=16, budget_mb=1, target="jetson-orin-nano", prune=(1.5,)))


def test_train_the_pick_on_synthetic_data(tmp_path):
    train = pytest.importorskip("edgeres.train")
    if not hasattr(train, "train_model"):
        pytest.skip("edgeres.train.train_model is not there yet")
    cfg = train.TrainConfig(epochs=1, batch_size=64, device="cpu")
    r = fit_wrn(FitOptions(depth=10, budget_mb=0.3, target="jetson-orin-nano", precision="int8", train=True,
                           train_config=cfg, train_data="synthetic", train_subset=128, train_out=str(tmp_path)))
    assert r.pick is not None and r.pick.measured_error is not None
    assert 0.0 <= r.pick.measured_error <= 100.0
    assert r.trained and r.trained[0]["synthetic"]
    assert (tmp_path / r.pick.model / "history.json").is_file()
    assert "trained err %" in r.table_rows()[0]
    assert any("synthetic" in n for n in r.notes)


def test_every_host_runtime_is_measured_and_latency_never_stops_the_search():
    """cpu-openvino runs here: measured through OpenVINO, and widths go on until memory stops them."""
    pytest.importorskip("openvino")
    r = fit_wrn(FitOptions(depth=10, budget_mb=64, target="cpu-openvino", precision="int8", batch=1,
                           latency_ms=1e-6, max_width=2, bench=BenchOptions(batch_sizes=(1,), warmup=1, runs=3)))
    assert [c.width for c in r.candidates] == [1, 2]  # nothing meets 1 ns, and still k=2 was sized
    assert all(c.latency.source == "measured" and c.latency.ms > 0 and "openvino" in c.latency.method
               for c in r.candidates)
    assert r.pick is None and "latency" in r.pick_reason
    assert not any("roofline" in n for n in r.notes)
