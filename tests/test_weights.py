"""The weights registry: records as published, offline finds, and downloads from a server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from edgeres import models, weights
from edgeres.errors import CheckpointError

# ---------------------------------------------------------------- the records


def test_torchvision_records_match_the_published_enums():
    r18 = weights.get("resnet18", "IMAGENET1K_V1")  # torchvision's spelling works too
    assert r18.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth" and r18.sha256 == "f37072fd"
    assert (r18.input_size, r18.preprocess.resize, r18.preprocess.interpolation) == (224, 256, "bilinear")
    assert r18.top1 == 69.758 and r18.num_classes == 1000
    v2 = weights.get("resnet50", "imagenet1k_v2")
    assert v2.file_name == "resnet50-11ad3fa6.pth" and v2.preprocess.resize == 232 and v2.top1 == 80.858
    wide = weights.get("wide_resnet50_2", "imagenet1k_v2")
    assert wide.file_name == "wide_resnet50_2-9ba9bcbe.pth" and wide.preprocess.resize == 232
    tags = {w.name for w in weights.RECORDS}
    for depth in (18, 34, 50, 101, 152):
        assert f"resnet{depth}.imagenet1k_v1" in tags
    for depth in (50, 101, 152):
        assert f"resnet{depth}.imagenet1k_v2" in tags
    for depth in (20, 32, 44, 56, 110):
        assert f"resnet{depth}.cifar10_akamaster" in tags
    for w in weights.RECORDS:  # every hash is the one in the publisher's file name
        assert weights.HASH_IN_NAME.search(w.file_name).group(1) == w.sha256[:8]
        assert models.is_known(w.model)


def test_class_names_ship_inside_the_package():
    classes = weights.get("resnet18", "imagenet1k_v1").classes
    ids = weights.get("resnet18", "imagenet1k_v1").class_ids
    assert len(classes) == 1000 and classes[0] == "tench" and ids[0] == "n01440764"
    assert list(ids) == sorted(ids)  # ImageNet index order = sorted WordNet ids
    assert weights.get("resnet20", "cifar10_akamaster").classes[:2] == ("airplane", "automobile")


def test_unknown_tag_names_the_known_ones():
    with pytest.raises(CheckpointError, match=r"resnet18\.imagenet1k_v1"):
        weights.get("resnet18", "imagenet1k_v9")


def test_akamaster_tag_found_offline_in_edgeres_data(data_root):
    rec = weights.get("resnet20", "cifar10_akamaster")
    path = weights.fetch(rec)
    assert path == data_root / rec.local


# ---------------------------------------------------------------- downloads from 127.0.0.1


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_short: set[str] = set()
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.rsplit("/", 1)[-1]
        self.hits.append(name)
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.cut_short:  # the server dies mid-transfer
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.cut_short, _Handler.hits = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _checkpoint_bytes(tmp_path: Path, name: str = "resnet20") -> bytes:
    torch.manual_seed(0)
    p = tmp_path / "src.pt"
    torch.save(models.create(name).state_dict(), p)
    return p.read_bytes()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty cache and data roots, downloads allowed, the publisher's files served from the mirror."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGERES_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("EDGERES_NO_DOWNLOAD", raising=False)
    return tmp_path


def _fake_record(body: bytes, *, good: bool = True) -> weights.Weights:
    digest = hashlib.sha256(body).hexdigest() if good else "0" * 64
    rec = weights.get("resnet20", "cifar10_akamaster")
    from dataclasses import replace

    return replace(rec, url=f"https://example.invalid/models/resnet20-{digest[:8]}.th", sha256=digest[:8], local=None)


def test_tag_downloads_once_into_the_cache_then_is_found_offline(server, isolated, monkeypatch):
    handler, base = server
    body = _checkpoint_bytes(isolated)
    rec = _fake_record(body)
    handler.files[rec.file_name] = body
    monkeypatch.setenv("EDGERES_WEIGHTS_MIRROR", base + "/models")
    path = weights.fetch(rec)
    assert path == weights.cache_dir() / rec.file_name and path.read_bytes() == body
    assert handler.hits == [rec.file_name]
    assert [p.name for p in path.parent.iterdir()] == [rec.file_name]  # no temp file left
    monkeypatch.setenv("EDGERES_NO_DOWNLOAD", "1")  # offline now: the cache answers, the server is not asked
    assert weights.fetch(rec) == path and handler.hits == [rec.file_name]


def test_wrong_hash_is_an_error_and_leaves_nothing(server, isolated, monkeypatch):
    handler, base = server
    body = _checkpoint_bytes(isolated)
    rec = _fake_record(body, good=False)
    handler.files[rec.file_name] = body
    monkeypatch.setenv("EDGERES_WEIGHTS_MIRROR", base)
    with pytest.raises(CheckpointError, match="nothing was kept"):
        weights.fetch(rec)
    cache = weights.cache_dir()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_interrupted_download_is_an_error_and_leaves_no_partial_file(server, isolated, monkeypatch):
    handler, base = server
    body = _checkpoint_bytes(isolated)
    rec = _fake_record(body)
    handler.files[rec.file_name] = body
    handler.cut_short.add(rec.file_name)
    monkeypatch.setenv("EDGERES_WEIGHTS_MIRROR", base)
    with pytest.raises(CheckpointError, match="cut short|IncompleteRead|failed"):
        weights.fetch(rec)
    cache = weights.cache_dir()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_no_download_forbids_the_network_for_tags(server, isolated, monkeypatch):
    handler, base = server
    rec = _fake_record(b"x")
    monkeypatch.setenv("EDGERES_WEIGHTS_MIRROR", base)
    monkeypatch.setenv("EDGERES_NO_DOWNLOAD", "1")
    with pytest.raises(CheckpointError, match="EDGERES_NO_DOWNLOAD.*--weights PATH"):
        weights.fetch(rec)
    assert handler.hits == []


def test_weights_url_loads_and_checks_the_hash_in_its_name(server, isolated):
    from edgeres.checkpoint import load_model

    handler, base = server
    body = _checkpoint_bytes(isolated)
    good = f"resnet20-{hashlib.sha256(body).hexdigest()[:8]}.pt"
    handler.files[good] = body
    handler.files["resnet20-00000000.pt"] = body
    handler.files["plain.pt"] = body
    model = load_model("resnet20", f"{base}/{good}")
    ref = torch.load(isolated / "src.pt", weights_only=True)
    assert torch.equal(model.state_dict()["fc.weight"], ref["fc.weight"])
    load_model("resnet20", f"{base}/{good}")  # second time: from the cache
    assert handler.hits == [good]
    assert load_model("resnet20", f"{base}/plain.pt") is not None  # no hash in the name: length check only
    with pytest.raises(CheckpointError, match="sha256"):
        load_model("resnet20", f"{base}/resnet20-00000000.pt")
    with pytest.raises(CheckpointError, match="cannot download"):
        load_model("resnet20", f"{base}/missing.pt")


def test_a_corrupt_cached_file_is_named(isolated, monkeypatch):
    rec = _fake_record(b"good bytes")
    path = weights.cache_dir() / rec.file_name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"bad bytes")
    monkeypatch.setenv("EDGERES_NO_DOWNLOAD", "1")
    with pytest.raises(CheckpointError, match=f"{path}.*sha256"):
        weights.fetch(rec)
