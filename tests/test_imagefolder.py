"""ImageFolder trees: streamed decode of real files, one preprocessing record, class names, bad files."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from PIL import Image

from edgeres import classes as class_lists
from edgeres import data, imagefolder, models
from edgeres.errors import DataError
from edgeres.preprocess import Preprocess, eval_array

PP224 = Preprocess.imagenet(224, resize=256)


def _image(path, mode="RGB", size=(300, 200), seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if mode == "CMYK":
        rgb.convert("CMYK").save(path.with_suffix(".jpg"))
        return path.with_suffix(".jpg")
    if mode == "EXIF":  # stored sideways, EXIF orientation 6 says "rotate to view"
        exif = Image.Exif()
        exif[0x0112] = 6
        rgb.save(path.with_suffix(".jpg"), exif=exif)
        return path.with_suffix(".jpg")
    rgb.convert(mode).save(path.with_suffix(".png"))
    return path.with_suffix(".png")


@pytest.fixture
def tree(tmp_path):
    """train/ and val/ with two classes and every image mode a user's folder may hold."""
    root = tmp_path / "pets"
    files = []
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            for i, mode in enumerate(("RGB", "L", "RGBA", "P", "CMYK", "EXIF")):
                files.append(_image(root / split / cls / f"{mode.lower()}{i}", mode, seed=10 * c + i))
    return root


def test_every_mode_decodes_and_matches_the_one_preprocessing(tree):
    ds = data.load_dataset(tree, "test", preprocess=PP224)
    assert isinstance(ds, imagefolder.FolderDataset)
    assert ds.classes == ["cat", "dog"] and len(ds) == 12
    ds.workers = 2  # worker processes, as for real
    before = signal.getsignal(signal.SIGCHLD)
    x, y = next(data.batches(ds, 12, mean=PP224.mean, std=PP224.std))
    assert signal.getsignal(signal.SIGCHLD) == before  # torch's handler does not outlive our workers
    assert x.shape == (12, 3, 224, 224) and x.dtype == torch.float32
    expected = np.stack([eval_array(f, PP224) for f in ds.files])
    assert torch.equal(x, torch.from_numpy(expected))
    assert y.tolist() == ds.labels.tolist()
    exif = next(f for f in ds.files if "exif" in f)  # 300x200 stored, 200x300 once rotated
    from edgeres.preprocess import load_rgb

    assert load_rgb(exif).size == (200, 300)


def test_training_draws_random_resized_crops_deterministically(tree):
    ds = data.load_dataset(tree, "train", preprocess=PP224, workers=0)
    a = next(data.batches(ds, 4, mean=PP224.mean, std=PP224.std, train=True, epoch=0))[0]
    b = next(data.batches(ds, 4, mean=PP224.mean, std=PP224.std, train=True, epoch=0))[0]
    c = next(data.batches(ds, 4, mean=PP224.mean, std=PP224.std, train=True, epoch=1))[0]
    evaluation = next(data.batches(ds, 4, mean=PP224.mean, std=PP224.std))[0]
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, evaluation)


def test_folders_are_matched_to_the_model_class_names(tree, tmp_path):
    ds = data.load_dataset(tree, "test", preprocess=PP224, classes=("bird", "dog", "cat"))
    assert ds.classes == ["bird", "dog", "cat"]
    assert set(ds.labels.tolist()) == {1, 2}  # cat -> 2, dog -> 1
    with pytest.raises(DataError, match="folder 'cat' is not one of the model's 2 classes"):
        data.load_dataset(tree, "test", preprocess=PP224, classes=("bird", "dog"))
    imagenet = class_lists.imagenet1k_names()
    wn = tmp_path / "wn"
    _image(wn / "val" / "n01440764" / "a")  # a WordNet id names its class too
    _image(wn / "val" / "goldfish" / "b")
    ds = data.load_dataset(wn, "test", preprocess=PP224, classes=imagenet)
    assert sorted(ds.labels.tolist()) == [0, 1]
    _image(wn / "val" / "crane" / "c")  # two ImageNet classes are called crane
    with pytest.raises(DataError, match="n02012849, n03126707"):
        data.load_dataset(wn, "test", preprocess=PP224, classes=imagenet)


def test_undecodable_file_is_named_or_skipped_and_counted(tree):
    bad = tree / "val" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = data.load_dataset(tree, "test", preprocess=PP224, workers=0)
    with pytest.raises(DataError, match="broken.jpg.*--skip-bad-images"):
        list(data.batches(ds, 4, mean=PP224.mean, std=PP224.std))
    ds = data.load_dataset(tree, "test", preprocess=PP224, skip_bad_images=True, workers=0)
    seen = sum(len(y) for _, y in data.batches(ds, 4, mean=PP224.mean, std=PP224.std))
    assert seen == len(ds) - 1 and len(ds.skipped) == 1 and "broken.jpg" in ds.skipped[0]


def test_missing_split_names_the_folder_expected(tmp_path):
    _image(tmp_path / "only" / "val" / "cat" / "a")
    with pytest.raises(DataError, match="no train split.*only/train/"):
        data.load_dataset(tmp_path / "only", "train", preprocess=PP224)


def test_a_shard_reads_only_its_own_files(tree):
    from edgeres.train import _shard

    ds = data.load_dataset(tree, "test", preprocess=PP224)
    parts = [_shard(ds, r, 3) for r in range(3)]
    assert sorted(f for p in parts for f in p.files) == sorted(ds.files)
    assert all(len(set(p.files) & set(q.files)) == 0 for p in parts for q in parts if p is not q)


def test_cifar_png_folder_scores_exactly_the_pickle_path(cifar_test, resnet20_weights, tmp_path):
    """CIFAR-10 test images written as PNG files give bit-identical inputs and logits to the pickle path."""
    from edgeres.checkpoint import load_model

    pick = data.subset(cifar_test, 200, seed=1)
    root = tmp_path / "cifar_png"
    for i, (img, label) in enumerate(zip(pick.images, pick.labels, strict=True)):
        path = root / "val" / pick.classes[int(label)] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    model = load_model("resnet20.cifar10_akamaster").eval()
    folder = data.for_model(model.cfg, root, "test")
    assert folder.classes == list(class_lists.CIFAR10)
    order = sorted(range(len(pick)), key=lambda i: (int(pick.labels[i]), i))  # folder order: class, then name
    ref = pick.take(torch.tensor(order))
    cfg = model.cfg
    x_ref, y_ref = next(data.batches(ref, 200, mean=cfg.mean, std=cfg.std))
    x_png, y_png = next(data.batches(folder, 200, mean=cfg.mean, std=cfg.std))
    assert torch.equal(x_ref, x_png) and torch.equal(y_ref, y_png)
    with torch.no_grad():
        assert torch.equal(model(x_ref), model(x_png))


def test_model_without_names_takes_the_folder_names(tree):
    model = models.create("resnet18", num_classes=2, input_size=224)
    assert model.cfg.classes is None
    ds = data.for_model(model.cfg, tree, "train")
    assert ds.classes == ["cat", "dog"] and ds.preprocess == model.cfg.preprocess


def test_jetson_bundle_from_an_image_folder(tmp_path):
    """The TensorRT bundle's golden inputs come from the first test images, streamed like any other."""
    import json

    from edgeres.latency import BenchOptions
    from edgeres.pipeline import ExportOptions, export

    root = tmp_path / "ten"
    for split in ("train", "val"):
        for c in range(10):
            _image(root / split / f"c{c}" / "a", size=(40, 36), seed=c)
    opts = ExportOptions(target="jetson-orin-nano", random_init=True, bench=BenchOptions(batch_sizes=(1,), runs=1))
    export("resnet20", data_spec=str(root), out=tmp_path / "bundle", options=opts)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["classes"] == [f"c{c}" for c in range(10)]
    assert "tensorrt_lint" in manifest
