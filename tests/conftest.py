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
