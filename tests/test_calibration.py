import pytest
import torch

from edgeres import calibration, data
from edgeres.errors import EdgeresError


def test_default_set_is_class_balanced_train_images():
    spec = calibration.load_calibration("default")
    assert spec.split == "train" and spec.class_balanced and spec.preprocessing == "eval"
    ds = data.synthetic(2000, split="train")
    chosen = calibration.calibration_set(spec, ds)
    assert len(chosen) == spec.size
    counts = torch.bincount(chosen.labels)
    assert counts.max() - counts.min() <= 1


def test_batches_use_eval_preprocessing():
    spec = calibration.load_calibration("small", size=40)
    ds = data.synthetic(200, split="train")
    xs = calibration.calibration_batches(spec, ds, (0.5,) * 3, (0.5,) * 3)
    assert sum(len(x) for x in xs) == 40
    assert torch.equal(torch.cat(xs), torch.cat(calibration.calibration_batches(spec, ds, (0.5,) * 3, (0.5,) * 3)))


def test_bad_definitions(tmp_path):
    (tmp_path / "x.toml").write_text('size = 10\nbogus = 1\n')
    with pytest.raises(EdgeresError, match="unknown key 'bogus'"):
        calibration.load_calibration(str(tmp_path / "x.toml"))
    (tmp_path / "y.toml").write_text('size = -3\n')
    with pytest.raises(EdgeresError, match="'size'"):
        calibration.load_calibration(str(tmp_path / "y.toml"))
    with pytest.raises(EdgeresError, match="not found"):
        calibration.load_calibration("nope")


def test_refuses_test_split_images():
    spec = calibration.load_calibration("default")
    with pytest.raises(EdgeresError, match="train split"):
        calibration.calibration_set(spec, data.synthetic(100, split="test"))
