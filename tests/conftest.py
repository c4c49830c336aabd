import os
from pathlib import Path

import pytest

os.environ.setdefault("EDGERES_NO_DOWNLOAD", "1")  # tests never reach the network
os.environ.setdefault("EDGERES_QUIET", "1")

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "EDGERES_DATA" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["EDGERES_DATA"] = str(_DEFAULT_DATA)

PRETRAINED = "pretrained/akamaster_pytorch_resnet_cifar10"


def _data_root() -> Path | None:
    root = os.environ.get("EDGERES_DATA")
    return Path(root) if root and (Path(root) / "cifar-10-batches-py").is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip("real CIFAR-10 not found: set EDGERES_DATA to a folder holding cifar-10-batches-py/")
    return root


@pytest.fixture(scope="session")
def cifar_test(data_root):
    from edgeres import data

    return data.load_dataset("cifar10", "test")


@pytest.fixture(scope="session")
def cifar_train(data_root):
    from edgeres import data

    return data.load_dataset("cifar10", "train")


@pytest.fixture(scope="session")
def resnet20_weights(data_root) -> Path:
    path = data_root / PRETRAINED / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"pretrained checkpoint {path} not found")
    return path


@pytest.fixture(scope="session")
def qdq_resnet20(tmp_path_factory):
    """A raw Q/DQ export (before any runtime flavour) of an int8 ResNet-20 calibrated on synthetic images."""
    import onnx
    import torch

    from edgeres import data, models
    from edgeres.compress import quantize
    from edgeres.export import export_onnx

    torch.manual_seed(0)
    net = models.create("resnet20").eval()
    ds = data.synthetic(n=32)
    batches = [x for x, _ in data.batches(ds, 16, mean=net.cfg.mean, std=net.cfg.std)]
    example = torch.zeros(1, 3, 32, 32)
    stripped = quantize.strip(quantize.ptq(net, batches, example_input=example), example)
    path = export_onnx(stripped, tmp_path_factory.mktemp("qdq") / "raw.onnx", input_size=32)
    return onnx.load(str(path))
