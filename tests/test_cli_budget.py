import json

import pytest
from typer.testing import CliRunner

from edgeres.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_sensitivity_ranks_every_quantized_layer_with_both_names():
    res = run("sensitivity", "resnet20", "--random-init", "--data", "synthetic", "--calib", 32, "--val-size", 32,
              "--threads", 1,
              "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    ranking = doc["ranking"]
    assert [r["rank"] for r in ranking] == list(range(1, 21))
    assert {r["module"] for r in ranking} >= {"conv1", "fc", "layer3.2.conv2"}
    assert all(r["node"].endswith(("/Conv", "/Gemm")) for r in ranking)
    keys = [(-r["recovered_pp"], r["logit_mse"]) for r in ranking]
    assert keys == sorted(keys)  # most sensitive first: top-1 recovered, then logit error
    assert doc["decided_on"]["images"] == 32 and doc["evaluations"] == 22  # reference, all-INT8, one per layer
    assert "leave-one-in-float" in doc["sensitivity_measure"]


def test_budget_options_are_checked_before_any_work(tmp_path):
    res = run("export", "resnet20", "--data", "synthetic", "--int8", "--keep-best", "--random-init",
              "--out", tmp_path / "a")
    assert res.exit_code == 2 and "--max-drop" in res.output
    res = run("export", "resnet20", "--data", "synthetic", "--max-drop", 0.1, "--random-init", "--out", tmp_path / "b")
    assert res.exit_code == 1 and "--int8" in str(res.exception)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_report_plot_draws_the_tradeoff(tmp_path):
    pytest.importorskip("matplotlib")
    from edgeres.report import VariantRow

    d = tmp_path / "exp"
    d.mkdir()
    rows = [VariantRow(variant=v, target="cpu", runtime="onnxruntime", precision=p, pruned=0.0, params=1, macs=1,
                       size_mb=1.0, latency_ms_p50=lat, throughput_ips=1.0, top1_error=err, top1_error_delta=0.0,
                       top1_accuracy=100 - err, eval_images=10, file="m.onnx").to_dict()
            for v, p, lat, err in [("fp32", "fp32", 1.0, 8.0), ("int8", "int8", 0.3, 8.4)]]
    (d / "report.json").write_text(json.dumps({"model": "resnet20", "rows": rows}))
    res = run("report", d, "--plot", tmp_path / "t.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.png").stat().st_size > 1000
