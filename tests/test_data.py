import pickle
import shutil

import numpy as np
import pytest
import torch

from edgeres import data
from edgeres.errors import DataError


def test_cifar10_test_split(cifar_test):
    assert len(cifar_test) == 10_000
    assert cifar_test.images.shape == (10_000, 3, 32, 32) and cifar_test.images.dtype == torch.uint8
    assert cifar_test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(cifar_test.labels).tolist() == [1000] * 10
    assert cifar_test.classes[0] == "airplane"


def _copy_cifar(data_root, tmp_path):
    dst = tmp_path / "cifar-10-batches-py"
    dst.mkdir()
    for f in ("batches.meta", "test_batch"):
        shutil.copy(data_root / "cifar-10-batches-py" / f, dst / f)
    return dst


def test_corrupt_copy_fails_md5_before_unpickling(data_root, tmp_path, monkeypatch):
    dst = _copy_cifar(data_root, tmp_path)
    raw = bytearray((dst / "test_batch").read_bytes())
    raw[-100] ^= 0xFF
    (dst / "test_batch").write_bytes(bytes(raw))
    called = []
    monkeypatch.setattr(data._ArrayUnpickler, "load", lambda self: called.append(1))
    with pytest.raises(DataError, match="md5"):
        data.load_dataset(tmp_path, "test")
    assert called == []


def test_hostile_pickle_is_refused():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import io

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._ArrayUnpickler(io.BytesIO(pickle.dumps(Evil())), encoding="bytes").load()


def test_missing_data_error_names_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERES_DATA", str(tmp_path / "nothing"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGERES_NO_DOWNLOAD", "1")
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", "test")
    msg = str(err.value)
    assert "--data" in msg and "EDGERES_DATA" in msg and str(tmp_path / "cache") in msg


def test_resolution_order_prefers_explicit_path_then_env(data_root, tmp_path, monkeypatch):
    _copy_cifar(data_root, tmp_path)
    monkeypatch.setenv("EDGERES_DATA", str(tmp_path))
    assert data.resolve_cifar(data.CIFAR["cifar10"]) == tmp_path / "cifar-10-batches-py"
    assert data.resolve_cifar(data.CIFAR["cifar10"], data_root) == data_root / "cifar-10-batches-py"


def test_unknown_data_is_clear():
    with pytest.raises(DataError, match="neither a known data set"):
        data.load_dataset("imagenet-nope", "test")


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(d / f"{i}.png")
    ds = data.load_dataset(tmp_path, "test", image_size=32)  # streamed: pixels are read per batch
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.image_shape == [3, 32, 32]
    x, y = next(data.batches(ds, 6, mean=(0, 0, 0), std=(1, 1, 1)))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0].mean() > 150 / 255 and x[-1, 2].mean() > 150 / 255


def test_class_balanced_subset_is_deterministic():
    ds = data.synthetic(500, num_classes=10)
    a, b = data.subset(ds, 100, seed=3), data.subset(ds, 100, seed=3)
    assert torch.equal(a.labels, b.labels) and torch.bincount(a.labels).tolist() == [10] * 10


def test_batches_normalise_and_augment_deterministically():
    ds = data.synthetic(64)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x, _ = next(data.batches(ds, 64, mean=mean, std=std))
    expect = (ds.images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expect)
    t1 = [b[0] for b in data.batches(ds, 16, mean=mean, std=std, train=True, seed=1, epoch=2)]
    t2 = [b[0] for b in data.batches(ds, 16, mean=mean, std=std, train=True, seed=1, epoch=2)]
    t3 = [b[0] for b in data.batches(ds, 16, mean=mean, std=std, train=True, seed=1, epoch=3)]
    assert all(torch.equal(a, b) for a, b in zip(t1, t2, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(t1, t3, strict=True))


def test_sharding_covers_every_image_once_per_rank_pair():
    idx = [data.epoch_order(10, train=True, seed=0, epoch=0, rank=r, world=2) for r in (0, 1)]
    assert len(idx[0]) == len(idx[1]) == 5
    assert sorted(np.concatenate([i.numpy() for i in idx]).tolist()) == list(range(10))
