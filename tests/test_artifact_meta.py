"""The metadata record inside artifacts: format, ONNX metadata_props, OpenVINO rt_info, engine sidecar, eval."""

from __future__ import annotations

import json
import shutil

import onnx
import onnxruntime as ort
import pytest
import torch

from edgeres import api, artifact_meta, models
from edgeres.artifact_meta import ArtifactMeta
from edgeres.errors import EdgeresError
from edgeres.export import export_onnx
from edgeres.preprocess import Preprocess

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _meta(**kw) -> ArtifactMeta:
    base = dict(model="resnet20", precision="int8", num_classes=10, input_size=32, preprocess=Preprocess.cifar(),
                classes=CIFAR10, weights={"tag": "resnet20.cifar10_akamaster", "sha256": "12fc"}, dataset="cifar10",
                target="cpu")
    return ArtifactMeta(**{**base, **kw})


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """A random-weight ResNet-20 ONNX (a mechanics check) carrying a record."""
    torch.manual_seed(0)
    net = models.create("resnet20").eval()
    path = tmp_path_factory.mktemp("meta") / "model.onnx"
    export_onnx(net, path, input_size=32)
    meta = artifact_meta.for_model(net, precision="fp32", weights={"random_init": True}, data_classes=list(CIFAR10))
    artifact_meta.embed_onnx(path, meta)
    return path, meta


def test_record_round_trips_and_spells_out_every_step():
    meta = _meta()
    d = json.loads(meta.to_json())
    assert d["format"] == artifact_meta.FORMAT and d["classes"][3] == "cat"
    assert d["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "layout": "NCHW", "dtype": "float32",
                          "color": "RGB"}
    assert d["preprocess"] == Preprocess.cifar().to_dict() and d["edgeres_version"]
    assert ArtifactMeta.from_json(meta.to_json()) == meta


def test_record_refuses_mismatches_and_other_formats():
    with pytest.raises(EdgeresError, match="3 class names for a model with 10 outputs"):
        _meta(classes=("a", "b", "c"))
    with pytest.raises(EdgeresError, match="differs from the preprocessing crop"):
        _meta(input_size=224)
    bad = {**_meta().to_dict(), "format": "edgeres-artifact/99"}
    with pytest.raises(EdgeresError, match="re-export"):
        ArtifactMeta.from_dict(bad)
    broken = _meta().to_dict()
    del broken["preprocess"]["mean"]
    with pytest.raises(EdgeresError, match="mean"):
        ArtifactMeta.from_dict(broken)


def test_classes_come_from_the_model_before_the_data_set():
    net = models.create("resnet20")
    assert artifact_meta.for_model(net, precision="fp32", data_classes=list(CIFAR10)).classes == CIFAR10
    from dataclasses import replace

    net.cfg = replace(net.cfg, classes=tuple(f"c{i}" for i in range(10)))
    assert artifact_meta.for_model(net, precision="fp32", data_classes=list(CIFAR10)).classes[0] == "c0"
    with pytest.raises(EdgeresError, match="the data set has 3 classes"):
        artifact_meta.for_model(models.create("resnet20"), precision="fp32", data_classes=["a", "b", "c"])


def test_onnx_carries_the_record_for_any_consumer(small_onnx):
    path, meta = small_onnx
    assert artifact_meta.read(path) == meta
    seen = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map  # what a foreign consumer sees
    assert json.loads(seen["edgeres"])["classes"] == list(CIFAR10)
    again = artifact_meta.set_onnx_meta(onnx.load(str(path)), meta)  # re-embedding replaces, never duplicates
    assert [p.key for p in again.metadata_props].count("edgeres") == 1


def test_artifact_without_record_is_one_clear_error(small_onnx, tmp_path):
    path, _ = small_onnx
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(EdgeresError, match="carries no edgeres metadata.*re-export"):
        artifact_meta.read(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgeresError, match="not a readable ONNX"):
        artifact_meta.read(tmp_path / "junk.onnx")
    with pytest.raises(EdgeresError, match="no edgeres metadata in artifact.json"):
        (tmp_path / "model.engine").write_bytes(b"opaque")
        artifact_meta.read(tmp_path / "model.engine")


def test_engine_reads_the_sidecar_beside_it(tmp_path):
    meta = _meta(target="jetson-orin-nano")
    artifact_meta.write_sidecar(tmp_path, meta, {"self_check": {"file": "golden.npz"}})
    (tmp_path / "model.engine").write_bytes(b"opaque")
    assert artifact_meta.read(tmp_path / "model.engine") == meta


def test_openvino_ir_carries_the_record(small_onnx, tmp_path):
    pytest.importorskip("openvino")
    from edgeres import targets
    from edgeres.backends.openvino import OpenVINOBackend

    path, meta = small_onnx
    artifact = OpenVINOBackend().compile(path, targets.load("cpu-openvino"), tmp_path / "model.xml")
    assert artifact_meta.read(artifact.path) == meta


def test_predict_reads_classes_and_preprocessing_from_the_artifact(small_onnx, tmp_path):
    from PIL import Image

    path, meta = small_onnx
    away = tmp_path / "elsewhere.onnx"
    shutil.copy(path, away)
    img = tmp_path / "a.png"
    Image.new("L", (40, 30), 128).save(img)
    report = api.predict(away, [img], top_k=3)
    top = report.predictions[0].top
    assert len(top) == 3 and all(name in CIFAR10 for _, name, _ in top)
    assert top[0][2] >= top[1][2] >= top[2][2] > 0
    assert report.to_dict()["predictions"][0]["top"][0]["class"] == top[0][1]
    with pytest.raises(EdgeresError, match="cannot decode image"):
        (tmp_path / "bad.jpg").write_bytes(b"nope")
        api.predict(away, [img, tmp_path / "bad.jpg"])


def test_eval_of_a_copied_artifact_refuses_data_with_other_classes(small_onnx, tmp_path):
    from PIL import Image

    path, _ = small_onnx

    def tree(name, classes):
        for split in ("train", "val"):
            for cls in classes:
                (tmp_path / name / split / cls).mkdir(parents=True)
                Image.new("RGB", (32, 32)).save(tmp_path / name / split / cls / "x.png")
        return str(tmp_path / name)

    # folders are matched to the artifact's class names: any folder that is not one of them is refused
    with pytest.raises(EdgeresError, match="folder 'a' is not one of the model's 10 classes"):
        api.eval_artifact(path, data_spec=tree("two", ("a", "b")))
    with pytest.raises(EdgeresError, match="folder 'c0' is not one of the model's 10 classes"):
        api.eval_artifact(path, data_spec=tree("ten", [f"c{i}" for i in range(10)]))


def test_predict_and_eval_commands(small_onnx, tmp_path, monkeypatch, capsys):
    import sys

    from PIL import Image
    from typer.testing import CliRunner

    from edgeres.cli import app, main

    path, _ = small_onnx
    img = tmp_path / "x.jpg"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    res = CliRunner().invoke(app, ["predict", str(path), str(img), "--top", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model"] == "resnet20" and len(doc["predictions"][0]["top"]) == 2
    res = CliRunner().invoke(app, ["eval", str(path), "--data", "synthetic", "--limit", "32", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["total"] == 32 and json.loads(res.stdout)["runtime"] == "onnxruntime"
    monkeypatch.setattr(sys, "argv", ["edgeres", "predict", str(path), str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "cannot decode image" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("target,name", [("cpu", "model.onnx"), ("cpu-openvino", "model.xml"),
                                         ("jetson-orin-nano", "model.onnx")])
def test_copied_artifact_gives_the_exported_figure_on_the_full_split(data_root, tmp_path, target, name):
    """INT8 ResNet-20 on all 10,000 CIFAR-10 test images: the artifact alone, copied away, scores what the export
    reported (the IR travels with its .bin)."""
    if target == "cpu-openvino":
        pytest.importorskip("openvino")
    from edgeres import pipeline

    out = tmp_path / "exp"
    report = pipeline.export("resnet20.cifar10_akamaster", data_spec="cifar10", out=out,
                             options=pipeline.ExportOptions(target=target, int8=True))
    away = tmp_path / "away"
    away.mkdir()
    for f in out.iterdir():
        if f.name == name or (name.endswith(".xml") and f.name == "model.bin"):
            shutil.copy(f, away / f.name)
    again = api.eval_artifact(away / name)  # no --data: the artifact names its data set
    assert again.result.total == report.rows[-1].eval_images == 10_000
    assert again.result.top1_error == report.rows[-1].top1_error
