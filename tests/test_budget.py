import json
from pathlib import Path

import pytest
import torch

from edgeres import budget, data, pipeline
from edgeres.backends.base import Artifact
from edgeres.bench import BenchOptions
from edgeres.errors import EdgeresError
from edgeres.fallback import quantized_layers

FAST = BenchOptions(batch_sizes=(1, 64), warmup=1, runs=5)


def test_held_out_slice_skips_calibration_and_balances_classes():
    ds = data.synthetic(n=400, num_classes=4)
    calib = data.subset_indices(ds, 40, seed=0)
    val = budget.held_out_slice(ds, calib, 100)
    assert len(val) == 100 and torch.bincount(val.labels).tolist() == [25, 25, 25, 25]
    picked = {bytes(img.numpy()) for img in val.images}
    assert not picked & {bytes(img.numpy()) for img in ds.images[calib]}
    with pytest.raises(EdgeresError, match="val-size"):
        budget.held_out_slice(ds, calib, 0)


class FakeJudge:
    """Top-1 error falls by a fixed amount for each sensitive layer kept in float; no runtime involved."""

    def __init__(self, raw, gains: dict[str, float], reference: float, float_error: float, tmp: Path) -> None:
        self.all = [layer.module for layer in quantized_layers(raw)]
        self.gains, self.ref, self.float_error = gains, reference, float_error
        self.runs_here, self.evaluations, self.reference = False, 0, None
        self.file = tmp / "a.onnx"
        self.file.write_bytes(b"x" * 1000)

    def __call__(self, model, name):
        self.evaluations += 1
        if name == "reference-fp32":
            err = self.ref
        elif name == "float":
            err = self.float_error
        else:
            floats = set(self.all) - {layer.module for layer in quantized_layers(model)}
            err = self.ref + 1.0 - sum(self.gains.get(m, 0.0) for m in floats)
        mse = 1.0 if name not in ("reference-fp32", "float") else 0.0
        return budget.Judgement(round(err, 4), mse), Artifact(self.file, "fake", "int8"), None

    def logits(self, session):
        return torch.zeros(2, 10).numpy()


def _search(raw, tmp_path, *, max_drop, float_error=9.0, keep_best=False):
    judge = FakeJudge(raw, {"conv1": 0.5, "layer3.2.conv2": 0.3, "fc": 0.1}, 9.0, float_error, tmp_path)
    cand = budget.Candidate(raw=raw, flavour=lambda m: m, fp16_fallback=False)
    return budget.search(cand, judge, reference_onnx=raw, float_onnx=raw if float_error != 9.0 else None,
                         options=budget.BudgetOptions(max_drop=max_drop, keep_best=keep_best),
                         decided_on={"images": 2, "source": "fake"}), judge


def test_search_falls_back_most_sensitive_first_until_within_budget(qdq_resnet20, tmp_path):
    result, judge = _search(qdq_resnet20, tmp_path, max_drop=0.25)
    assert [r.module for r in result.ranking[:3]] == ["conv1", "layer3.2.conv2", "fc"]
    assert result.ranking[0].recovered_pp == 0.5 and len(result.ranking) == 20
    assert result.met and [s.layer for s in result.steps] == ["conv1", "layer3.2.conv2"]
    assert [s.val_drop_pp for s in result.steps] == [0.5, 0.2]
    assert result.float_nodes == ["/conv1/Conv", "/layer3/layer3.2/conv2/Conv"]
    assert result.steps[0].size_mb == 0.001 and result.steps[0].latency_ms_p50 is None  # not measured: TensorRT
    doc = result.to_dict()
    assert doc["validation"]["all_int8_drop_pp"] == 1.0 and doc["validation"]["pruning_cost_pp"] == 0.0
    assert [f["layer"] for f in doc["fallback"]] == ["conv1", "layer3.2.conv2"]
    assert judge.evaluations == 1 + 1 + 20 + 2  # reference, all-INT8, one per layer, two steps


def test_search_within_budget_needs_no_ranking(qdq_resnet20, tmp_path):
    result, judge = _search(qdq_resnet20, tmp_path, max_drop=1.0)
    assert result.met and result.float_nodes == [] and result.ranking == [] and judge.evaluations == 2


def test_search_says_when_pruning_alone_exceeds_the_budget(qdq_resnet20, tmp_path):
    result, judge = _search(qdq_resnet20, tmp_path, max_drop=0.3, float_error=9.5)
    assert not result.met and "pruning alone costs +0.50 pp" in result.verdict
    assert result.ranking == [] and judge.evaluations == 3  # no search when no fallback can reach it
    assert result.to_dict()["validation"]["pruning_cost_pp"] == 0.5


def test_search_out_of_reach_keeps_the_best_only_when_asked(qdq_resnet20, tmp_path):
    result, _ = _search(qdq_resnet20, tmp_path, max_drop=0.05)
    assert not result.met and "best reached is +0.10 pp" in result.verdict and result.float_nodes == []
    kept, _ = _search(qdq_resnet20, tmp_path, max_drop=0.05, keep_best=True)
    assert not kept.met and len(kept.float_nodes) == 3  # conv1, layer3.2.conv2, fc: +0.10 pp


def _opts(**kw):
    return pipeline.ExportOptions(int8=True, calib_size=32, eval_limit=64, bench=FAST, random_init=True, **kw)


def test_export_with_budget_reports_what_decided_and_what_measured(tmp_path):
    out = tmp_path / "b"
    report = pipeline.export("resnet20", data_spec="synthetic", out=out,
                             options=_opts(budget=budget.BudgetOptions(max_drop=100.0, val_size=64)))
    doc = json.loads((out / "report.json").read_text())
    b = doc["budget"]
    assert b["met"] and b["decided_on"]["images"] == 64 and "held out from calibration" in b["decided_on"]["source"]
    assert b["decided_on"]["measured_on"].startswith("64 synthetic test") and b["test"]["images"] == 64
    assert any(n.startswith("INT8 budget 100.0 pp") for n in report.notes)
    final = doc["rows"][-1]
    assert final["int8_macs_pct"] == 100.0 and final["int8_coverage"]["source"].startswith("measured")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mixed_precision"]["float_layers"] == [] and manifest["validation"]["int8_coverage"]


def test_budget_needs_int8_and_honest_validation_images(tmp_path):
    with pytest.raises(EdgeresError, match="--int8"):
        pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "x",
                        options=pipeline.ExportOptions(budget=budget.BudgetOptions(max_drop=0.1)))
    with pytest.raises(EdgeresError, match="test split"):
        pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "y",
                        options=_opts(budget=budget.BudgetOptions(max_drop=0.1, val_data="synthetic")))
    assert not (tmp_path / "y").exists()
    with pytest.raises(EdgeresError, match="pruned checkpoint"):
        pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "z",
                        options=_opts(baseline="resnet20"))


@pytest.mark.slow
def test_pruned_checkpoint_exports_against_its_unpruned_baseline(tmp_path):
    from edgeres import models
    from edgeres.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "r20.pt", models.create("resnet20"))
    first = pipeline.export("resnet20", weights=tmp_path / "r20.pt", data_spec="synthetic", out=tmp_path / "p",
                            options=pipeline.ExportOptions(prune=0.5, prune_epochs=1, eval_limit=64, bench=FAST))
    assert (tmp_path / "p" / "pruned.pt").is_file()
    again = pipeline.export("resnet20", weights=tmp_path / "p" / "pruned.pt", data_spec="synthetic",
                            out=tmp_path / "q", options=pipeline.ExportOptions(
                                int8=True, calib_size=32, eval_limit=64, bench=FAST,
                                baseline=str(tmp_path / "r20.pt")))
    variants = [r.variant for r in again.rows]
    assert variants == ["fp32", "pruned fp32", "pruned int8"]
    assert again.rows[0].macs == first.rows[0].macs and again.rows[1].macs == first.rows[1].macs
    assert again.rows[0].top1_error == first.rows[0].top1_error  # the same unpruned model, measured the same way
    assert again.rows[1].pruned == 0.5 and again.prune["baseline"] == str(tmp_path / "r20.pt")
