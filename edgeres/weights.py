"""Published weights as typed records, and the one place that finds or downloads them.

A tag (`resnet18.imagenet1k_v1`, `resnet20.cifar10_akamaster`) names one `Weights` record: where the
publisher serves the file and its sha256 (whole, or the 8-hex torch.hub prefix in the file name), the
input size, the preprocessing it was trained with, its class names and its published top-1 with the
source. Records follow torchvision's weight enums (torchvision/models/resnet.py: url, `transforms`
with `resize_size`, `_metrics["ImageNet-1K"]["acc@1"]`) and akamaster/pytorch_resnet_cifar10's README.

`fetch(record)` finds the file offline first (the user cache, `$EDGERES_DATA`, torch.hub's cache), else
downloads it once into the user cache with a progress bar on stderr: to a temp file, hash-checked,
then renamed, so a wrong or cut-short download leaves nothing behind. `$EDGERES_NO_DOWNLOAD` forbids the
network for tags; `$EDGERES_WEIGHTS_MIRROR` serves the publishers' file names from another base URL
(a company mirror, or a test server on 127.0.0.1). `fetch_url` takes any http(s) URL (`--weights URL`),
hash-checked when its file name carries a torch.hub hash.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edgeres import classes as class_lists
from edgeres.errors import CheckpointError
from edgeres.io import atomic_write, sha256sum
from edgeres.preprocess import Preprocess

HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub's convention: resnet18-f37072fd.pth
TIMEOUT_S = 60
CHUNK = 1 << 20


@dataclass(frozen=True)
class Weights:
    """One published set of weights for a registered model."""

    model: str  # edgeres model name (models.create)
    tag: str
    url: str
    sha256: str  # the whole digest, or the hex prefix the file name carries
    dataset: str  # what it was trained on
    num_classes: int
    input_size: int
    preprocess: Preprocess
    top1: float  # published top-1 accuracy, percent
    top1_source: str
    classes_from: str  # "imagenet1k" | "cifar10"
    local: str | None = None  # path under a data root where a copy may sit
    arch: dict = field(default_factory=dict)  # builder options the file needs

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def file_name(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name

    @property
    def classes(self) -> tuple[str, ...]:
        return class_lists.imagenet1k_names() if self.classes_from == "imagenet1k" else class_lists.CIFAR10

    @property
    def class_ids(self) -> tuple[str, ...]:
        """Other names a data folder may use for each class (ImageNet's WordNet ids)."""
        return class_lists.aliases(self.classes)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "url": self.url, "sha256": self.sha256, "dataset": self.dataset,
            "num_classes": self.num_classes, "input_size": self.input_size, "top1": self.top1,
            "top1_source": self.top1_source, "preprocess": self.preprocess.to_dict(),
        }


# ---------------------------------------------------------------- the records

_TV = "https://download.pytorch.org/models/"
_TV_SRC = "torchvision ResNet{n}_Weights.{v} (torchvision/models/resnet.py, _metrics ImageNet-1K acc@1)"
_TV_WIDE_SRC = "torchvision Wide_ResNet{n}_2_Weights.{v} (torchvision/models/resnet.py, _metrics ImageNet-1K acc@1)"
_AKA = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_AKA_SRC = "akamaster/pytorch_resnet_cifar10 README, test error {err}% (this impl.)"
_AKA_DIR = "pretrained/akamaster_pytorch_resnet_cifar10/"


def _torchvision(model: str, version: str, file: str, top1: float, resize: int, wide: bool = False) -> Weights:
    n = re.sub(r"\D", "", model.split("_2")[0]) if wide else model.removeprefix("resnet")
    src = (_TV_WIDE_SRC if wide else _TV_SRC).format(n=n, v=f"IMAGENET1K_{version}")
    return Weights(
        model=model, tag=f"imagenet1k_{version.lower()}", url=_TV + file, sha256=HASH_IN_NAME.search(file).group(1),
        dataset="imagenet-1k", num_classes=1000, input_size=224,
        preprocess=Preprocess.imagenet(224, resize=resize, interpolation="bilinear"),
        top1=top1, top1_source=src, classes_from="imagenet1k", arch={"input_size": 224},
    )


def _akamaster(depth: int, file: str, err: float, sha256: str | None = None) -> Weights:
    return Weights(
        model=f"resnet{depth}", tag="cifar10_akamaster", url=_AKA + file,
        sha256=sha256 or HASH_IN_NAME.search(file).group(1), dataset="cifar10", num_classes=10, input_size=32,
        preprocess=Preprocess.cifar(32), top1=round(100 - err, 2), top1_source=_AKA_SRC.format(err=err),
        classes_from="cifar10", local=_AKA_DIR + file,
    )


RECORDS: tuple[Weights, ...] = (
    # torchvision: V1 = the original simple recipe (eval resize 256); V2 = the new recipe (eval resize 232)
    _torchvision("resnet18", "V1", "resnet18-f37072fd.pth", 69.758, 256),
    _torchvision("resnet34", "V1", "resnet34-b627a593.pth", 73.314, 256),
    _torchvision("resnet50", "V1", "resnet50-0676ba61.pth", 76.130, 256),
    _torchvision("resnet50", "V2", "resnet50-11ad3fa6.pth", 80.858, 232),
    _torchvision("resnet101", "V1", "resnet101-63fe2227.pth", 77.374, 256),
    _torchvision("resnet101", "V2", "resnet101-cd907fc2.pth", 81.886, 232),
    _torchvision("resnet152", "V1", "resnet152-394f9c45.pth", 78.312, 256),
    _torchvision("resnet152", "V2", "resnet152-f82ba261.pth", 82.284, 232),
    _torchvision("wide_resnet50_2", "V1", "wide_resnet50_2-95faca4d.pth", 78.468, 256, wide=True),
    _torchvision("wide_resnet50_2", "V2", "wide_resnet50_2-9ba9bcbe.pth", 81.602, 232, wide=True),
    _torchvision("wide_resnet101_2", "V1", "wide_resnet101_2-32ee1156.pth", 78.848, 256, wide=True),
    _torchvision("wide_resnet101_2", "V2", "wide_resnet101_2-d733dc28.pth", 82.510, 232, wide=True),
    # akamaster CIFAR-10 (option-A shortcuts, ImageNet mean/std on 32x32); whole sha256 where we hold the file
    _akamaster(20, "resnet20-12fca82f.th", 8.27, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
    _akamaster(32, "resnet32-d509ac18.th", 7.37, "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
    _akamaster(44, "resnet44-014dd654.th", 6.90, "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
    _akamaster(56, "resnet56-4bfd9763.th", 6.61, "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
    _akamaster(110, "resnet110-1d1ed7c2.th", 6.32),
)
_BY_NAME = {(w.model, w.tag): w for w in RECORDS}


def list_weights(model: str | None = None) -> list[Weights]:
    return [w for w in RECORDS if model is None or w.model == model]


def get(model: str, tag: str) -> Weights:
    """The record for `model.tag` (tags are case-insensitive: IMAGENET1K_V1 works too)."""
    found = _BY_NAME.get((model.lower(), tag.lower()))
    if found is None:
        own = [w.tag for w in list_weights(model.lower())]
        known = ", ".join(f"{model}.{t}" for t in own) if own else ", ".join(w.name for w in RECORDS)
        raise CheckpointError(f"unknown weights tag {model}.{tag}; known: {known}")
    return found


# ---------------------------------------------------------------- finding and fetching files


def cache_dir() -> Path:
    """Where downloaded weights live: $XDG_CACHE_HOME/edgeres/weights or ~/.cache/edgeres/weights."""
    from edgeres.data import cache_dir as edgeres_cache

    return edgeres_cache() / "weights"


def _torch_hub_dir() -> Path:
    home = os.environ.get("TORCH_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                               / "torch")
    return Path(home) / "hub" / "checkpoints"


def _candidates(record: Weights) -> list[Path]:
    from edgeres.data import data_roots

    paths = [cache_dir() / record.file_name]
    for root in data_roots():
        if record.local:
            paths.append(root / record.local)
        paths.append(root / "pretrained" / record.file_name)
    paths.append(_torch_hub_dir() / record.file_name)  # torchvision's own download, if the user has one
    return list(dict.fromkeys(paths))


def _hash_ok(digest: str, expected: str) -> bool:
    return digest == expected if len(expected) == 64 else digest.startswith(expected)


def _check_file(path: Path, expected: str) -> None:
    if not _hash_ok(sha256sum(path), expected):
        raise CheckpointError(f"{path} fails its sha256 check (expected {expected}...); delete it and fetch again, "
                              "or replace it with the published file")


def fetch(record: Weights) -> Path:
    """The verified file for `record`: found offline, or downloaded once into the user cache."""
    for path in _candidates(record):
        if path.is_file():
            _check_file(path, record.sha256)
            return path
    if os.environ.get("EDGERES_NO_DOWNLOAD"):
        looked = ", ".join(str(p.parent) for p in _candidates(record))
        raise CheckpointError(
            f"weights {record.name} ({record.file_name}) not found offline (looked in {looked}) and "
            f"EDGERES_NO_DOWNLOAD is set; put {record.url} in {cache_dir()}, or pass --weights PATH"
        )
    return download(_mirrored(record.url), cache_dir() / record.file_name, record.sha256)


def _mirrored(url: str) -> str:
    mirror = os.environ.get("EDGERES_WEIGHTS_MIRROR")
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + Path(urllib.parse.urlparse(url).path).name


def fetch_url(url: str) -> Path:
    """`--weights URL`: download once into the user cache; hash-checked when the name carries a hash."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise CheckpointError(f"{url} names no file; pass the URL of the checkpoint file itself")
    m = HASH_IN_NAME.search(name)
    expected = m.group(1) if m else None
    dest = cache_dir() / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if dest.is_file():
        if expected:
            _check_file(dest, expected)
        return dest
    return download(url, dest, expected)


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Stream `url` to `dest` through a temp file beside it; hash and length checked before the rename."""
    from edgeres.progress import progress

    h = hashlib.sha256()
    got = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, atomic_write(dest) as tmp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with open(tmp, "wb") as out, progress() as bar:
                task = bar.add_task(f"download {dest.name}", total=total, status="")
                while block := resp.read(CHUNK):
                    out.write(block)
                    h.update(block)
                    got += len(block)
                    bar.update(task, advance=len(block), status=f"{got / 1e6:.1f} MB")
            if total is not None and got != total:
                raise CheckpointError(f"download of {url} was cut short ({got} of {total} bytes); nothing was "
                                      "kept, retry")
            if sha256 and not _hash_ok(h.hexdigest(), sha256):
                raise CheckpointError(f"download of {url} has sha256 {h.hexdigest()[:16]}..., not {sha256}...; "
                                      "nothing was kept. Check the URL or the mirror")
    except CheckpointError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot download {url}: {getattr(exc, 'reason', exc)}; retry, or pass --weights "
                              "PATH to a local copy") from exc
    except http.client.HTTPException as exc:  # IncompleteRead: the server closed before Content-Length
        raise CheckpointError(f"download of {url} failed ({type(exc).__name__}: {exc}); nothing was kept, "
                              "retry") from exc
    return dest
