import json

import pytest

from edgeres import pipeline
from edgeres.errors import EdgeresError, TargetError
from edgeres.latency import BenchOptions

FAST = BenchOptions(batch_sizes=(1, 64), warmup=1, runs=5)
REQUIRED = {"variant", "target", "precision", "pruned", "params", "macs", "size_mb", "latency_ms_p50",
            "throughput_ips", "top1_error", "top1_error_delta"}


def _opts(**kw):
    return pipeline.ExportOptions(calib_size=32, eval_limit=64, bench=FAST, random_init=True, **kw)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "r20"
    report = pipeline.export("resnet20", data_spec="synthetic", out=out, options=_opts(int8=True))
    return out, report


def test_int8_export_folder_and_report_schema(int8_export):
    out, report = int8_export
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "fp32.onnx", "manifest.json", "report.json"}
    doc = json.loads((out / "report.json").read_text())
    assert [r["variant"] for r in doc["rows"]] == ["fp32", "int8"]
    for row in doc["rows"]:
        assert set(row) >= REQUIRED
        assert row["latency_ms_p50"] > 0 and row["throughput_ips"] > 0 and row["eval_images"] == 64
    assert doc["rows"][0]["top1_error_delta"] == 0.0
    assert doc["bn_fold"]["folded"] == 19 and doc["bn_fold"]["max_abs_logit_diff"] < 1e-4
    assert doc["notes"] and "synthetic" in doc["notes"][0]
    from edgeres.hostcpu import cpu_name

    assert doc["host"]["cpu"] == cpu_name() and doc["host"]["threads"] >= 1  # where the latency was measured
    assert any(cpu_name() in n and "threads" in n for n in doc["notes"])


def test_int8_file_shrinks_and_manifest_hashes_files(int8_export):
    out, report = int8_export
    fp32, int8 = report.rows
    assert int8.size_mb <= 0.3 * fp32.size_mb
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["input_shape"] == ["batch", 3, 32, 32]
    assert manifest["quantization"]["calibration"]["size"] == 32
    from edgeres.io import sha256sum

    assert manifest["files"]["model.onnx"]["sha256"] == sha256sum(out / "model.onnx")
    assert {"torch", "nncf", "onnx", "onnxruntime"} <= set(manifest["versions"])


def test_exported_files_describe_themselves_and_evaluate_alone(int8_export, tmp_path):
    """A copied-away model.onnx needs nothing beside it: eval gives the figure the export reported."""
    import shutil

    from edgeres import api, artifact_meta

    out, report = int8_export
    meta = artifact_meta.read(out / "model.onnx")
    assert meta.precision == "int8" and artifact_meta.read(out / "fp32.onnx").precision == "fp32"
    assert meta.weights == {"random_init": True} and meta.preprocess.mean == (0.485, 0.456, 0.406)
    assert meta.classes is None  # synthetic data has no real class names; none are invented
    shutil.copy(out / "model.onnx", tmp_path / "model.onnx")
    again = api.eval_artifact(tmp_path / "model.onnx", data_spec="synthetic", limit=64)
    assert again.result.top1_error == report.rows[-1].top1_error


def test_failure_leaves_previous_folder_intact(int8_export, tmp_path, monkeypatch):
    out, _ = int8_export
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_agreement", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export("resnet20", data_spec="synthetic", out=out, options=_opts(int8=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_pruned_fp32_export_reports_smaller_macs(tmp_path):
    report = pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "p",
                             options=_opts(prune=0.5, prune_epochs=1))
    variants = [r.variant for r in report.rows]
    assert variants == ["fp32", "pruned fp32", "pruned fp32"] or variants[:2] == ["fp32", "pruned fp32"]
    assert report.rows[-1].macs < 0.7 * report.rows[0].macs
    assert report.prune["macs_cut"] > 0.3 and len(report.prune["history"]) == 1
    assert report.prune["distillation"]["temperature"] > 0
    # the pruned, fine-tuned model is kept as a checkpoint that reloads to the same logits, with the baseline
    import torch

    from edgeres.checkpoint import load_model

    pruned = load_model("resnet20", tmp_path / "p" / "pruned.pt").eval()
    saved = torch.load(tmp_path / "p" / "pruned.pt", weights_only=True)
    assert saved["extra"]["unpruned_baseline"]["top1_error"] == report.rows[0].top1_error
    assert sum(p.numel() for p in pruned.parameters()) == report.rows[1].params
    # exported with --random-init: every row says so, and so does the kept checkpoint when loaded again
    from edgeres.checkpoint import untrained
    from edgeres.report import RANDOM_WEIGHTS

    assert {r.weights for r in report.rows} == {RANDOM_WEIGHTS} and untrained(pruned)


@pytest.mark.parametrize(
    "kw,match",
    [({"prune": 1.5}, "--prune"), ({"qat_epochs": 1}, "--int8"), ({"prune_epochs": 2}, "--prune R"),
     ({"prune": 0.5, "prune_epochs": 1, "train_precision": "fp8"}, "--train-precision"),
     ({"prune": 0.5, "prune_epochs": 1, "train_device": "tpu"}, "--train-device")],
)
def test_bad_options(tmp_path, kw, match):
    with pytest.raises(EdgeresError, match=match):
        pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "x", options=_opts(**kw))
    assert not (tmp_path / "x").exists()


def test_int8_on_board_without_int8_suggests_fp16(tmp_path):
    with pytest.raises(TargetError, match="fp16"):
        pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "x",
                        options=_opts(int8=True, target="jetson-nano"))


def test_eval_artifact_matches_report(int8_export):
    from edgeres import api

    out, report = int8_export
    res = api.eval_artifact(out / "model.onnx", data_spec="synthetic", limit=64)
    assert res.runtime == "onnxruntime"
    assert res.result.top1_error == report.rows[-1].top1_error


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("jet") / "bundle"
    report = pipeline.export("resnet20", data_spec="synthetic", out=out,
                             options=_opts(int8=True, target="jetson-xavier-nx"))
    return out, report


def test_jetson_bundle_contents(jetson_bundle):
    out, report = jetson_bundle
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "build.sh", "README.md", "manifest.json", "report.json"} <= names
    assert {"calibration.cache", "model.noqdq.onnx"} <= names  # Xavier NX has two DLA cores
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "jetson-xavier-nx" and manifest["compute_capability"] == "7.2"
    assert "8.5.2" in manifest["tensorrt_versions"]
    assert manifest["tensorrt_lint"]["ok"] is True
    assert set(manifest["files"]) >= {"model.onnx", "build.sh", "calibration.cache"}
    assert all(r.latency_ms_p50 is None and "not measured" in r.latency_source for r in report.rows)
    assert report.host is None  # nothing was timed here, so no host is named


def test_jetson_bundle_passes_lint_and_has_no_uint8(jetson_bundle):
    import onnx

    from edgeres.check import check_onnx

    out, _ = jetson_bundle
    assert check_onnx(out / "model.onnx", "jetson-xavier-nx").ok
    m = onnx.load(str(out / "model.onnx"))
    uint8 = [t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert uint8 == []


def test_openvino_target_exports_ir_measured_through_openvino(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra: pip install 'edgeres[openvino]'")
    out = tmp_path / "ov"
    report = pipeline.export("resnet20", data_spec="synthetic", out=out, options=_opts(int8=True,
                                                                                      target="cpu-openvino"))
    assert {"model.xml", "model.bin", "fp32.xml", "fp32.bin"} <= {p.name for p in out.iterdir()}
    fp32, int8 = report.rows
    assert int8.runtime == "openvino" and int8.file == "model.xml" and fp32.precision == "fp32"
    assert int8.size_mb <= 0.45 * fp32.size_mb and int8.latency_ms_p50 > 0
    assert json.loads((out / "manifest.json").read_text())["validation"]["runtime"] == "openvino"


def test_export_latency_is_measured_as_bench_measures_it(tmp_path, monkeypatch):
    """export's latency column and `edgeres bench` on the same model.onnx: one function, in a fresh worker."""
    from edgeres import latency
    from edgeres.bench import bench_path

    calls = []
    real = latency.Worker.measure

    def spy(self, artifact, options, input_shape):
        m = real(self, artifact, options, input_shape)
        calls.append((artifact.path.name, options.warmup, options.runs, m))
        return m

    monkeypatch.setattr(latency.Worker, "measure", spy)
    report = pipeline.export("resnet20", data_spec="synthetic", out=tmp_path / "r20",
                             options=pipeline.ExportOptions(eval_limit=16, bench=FAST, random_init=True))
    row = report.rows[-1]
    name, warmup, runs, m = calls[-1]
    assert name == "model.onnx" and m.fresh_process and row.latency_ms_p50 == m.at(1).p50_ms
    assert "fresh worker process" in row.latency_source
    bench = bench_path(tmp_path / "r20" / "model.onnx", latency.BenchOptions(batch_sizes=(1,), warmup=warmup,
                                                                             runs=runs))
    assert calls[-1][0] == "model.onnx" and calls[-1][3].fresh_process
    # same file, same measurement: only machine noise separates the figures (2 shared cores here)
    assert 1 / 3 < bench.rows[0].p50_ms / row.latency_ms_p50 < 3
