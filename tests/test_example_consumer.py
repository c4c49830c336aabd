"""examples/onnxruntime_predict.py, a consumer without edgeres, against edgeres's preprocessing and predict.

Its preprocessing must equal edgeres.preprocess exactly (array equality) on the real sample images
(grayscale, EXIF-rotated, tiny and huge ones), and its top-5 must equal `edgeres predict`'s.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeres import api, artifact_meta, models
from edgeres.export import export_onnx
from edgeres.preprocess import Preprocess, eval_array

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnxruntime_predict.py"
# grayscale, grayscale + EXIF, tiny (upscaled), huge, huge + EXIF, portrait + EXIF, square grayscale, plain RGB
SUBSET = ("n01871265_tusker.JPEG", "n03866082_overskirt.JPEG", "n02096051_Airedale.JPEG",
          "n02676566_acoustic_guitar.JPEG", "n02091032_Italian_greyhound.JPEG", "n03843555_oil_filter.JPEG",
          "n01784675_centipede.JPEG", "n04254680_soccer_ball.JPEG", "n01440764_tench.JPEG")
RECORDS = [Preprocess.imagenet(), Preprocess.imagenet(224, 232, "bicubic"), Preprocess.cifar(),
           Preprocess.imagenet(64, 73, "lanczos"), Preprocess.imagenet(96, 96, "nearest")]


def _sample_dir() -> Path:
    root = Path(os.environ.get("EDGERES_DATA", "")) / "imagenet-sample"
    if not (root / "images").is_dir():
        pytest.skip("imagenet-sample/ not found under EDGERES_DATA")
    return root


def _example():
    spec = importlib.util.spec_from_file_location("onnxruntime_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _imagenet_classes(root: Path) -> tuple[str, ...]:
    lines = (root / "imagenet_classes.tsv").read_text().splitlines()[1:]
    return tuple(line.split("\t")[2] for line in lines)


def test_example_imports_nothing_from_edgeres():
    text = EXAMPLE.read_text()
    assert "edgeres" not in {line.split()[1].split(".")[0] for line in text.splitlines()
                             if line.startswith(("import ", "from "))}


def _assert_same_pixels(names, records):
    example, root = _example(), _sample_dir()
    for name in names:
        for pp in records:
            ours = eval_array(root / "images" / name, pp)
            theirs = example.preprocess(str(root / "images" / name), pp.to_dict())
            assert theirs.dtype == ours.dtype == np.float32
            assert np.array_equal(theirs, ours), (name, pp)


def test_example_preprocessing_equals_edgeres_on_sample_images():
    _assert_same_pixels(SUBSET, RECORDS)


@pytest.mark.slow
def test_example_preprocessing_equals_edgeres_on_all_200_images():
    names = sorted(p.name for p in (_sample_dir() / "images").iterdir())
    assert len(names) == 200
    _assert_same_pixels(names, RECORDS)


def _imagenet_model(tmp_path: Path, input_size: int) -> Path:
    """A torchvision-layout ResNet-18 with random weights (a mechanics check), its record in the ONNX."""
    root = _sample_dir()
    torch.manual_seed(0)
    net = models.create("resnet18", num_classes=1000, input_size=input_size).eval()
    path = tmp_path / "model.onnx"
    export_onnx(net, path, input_size=input_size)
    meta = artifact_meta.for_model(net, precision="fp32", weights={"random_init": True},
                                   data_classes=_imagenet_classes(root), dataset="imagenet")
    artifact_meta.embed_onnx(path, meta)
    return path


def _assert_same_predictions(model: Path, images: list[Path]):
    ours = api.predict(model, images, top_k=5).to_dict()["predictions"]
    theirs = _example().predict(str(model), [str(p) for p in images], top=5)
    assert len(ours) == len(theirs) == len(images)
    for a, b in zip(ours, theirs, strict=True):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == [t["probability"] for t in b["top"]]


def test_example_predictions_equal_edgeres_predict(tmp_path):
    root = _sample_dir()
    model = _imagenet_model(tmp_path, 64)  # resize 73, crop 64: every step of the record is exercised
    _assert_same_predictions(model, [root / "images" / n for n in SUBSET])


@pytest.mark.slow
def test_example_predictions_equal_edgeres_predict_on_all_200_at_224(tmp_path):
    root = _sample_dir()
    model = _imagenet_model(tmp_path, 224)
    _assert_same_predictions(model, sorted((root / "images").iterdir()))


def test_example_cli_prints_json(tmp_path, capsys):
    root = _sample_dir()
    model = _imagenet_model(tmp_path, 64)
    assert _example().main([str(model), str(root / "images" / SUBSET[0]), "--top", "2", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert len(doc[0]["top"]) == 2 and doc[0]["top"][0]["class"] in _imagenet_classes(root)
