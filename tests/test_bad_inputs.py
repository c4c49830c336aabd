"""Bad input, every command: one `error:` line (or a usage error, exit 2), no traceback, nothing touched.

Each case runs the CLI's `main()` in-process inside a workspace of hostile and broken things (a user's own
folder, a file, garbage and hostile checkpoints, broken data sets and artifacts). Before and after, every file
in the workspace is hashed: no pre-existing file may change and no new file may appear (nothing half-written).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{ws}" is replaced by the workspace path
    needle: str  # must appear in the error line
    code: int = 1
    setup: Callable[[Path, pytest.MonkeyPatch], contextlib.AbstractContextManager] | None = None


# ---------------------------------------------------------------- the workspace


class _Hostile:
    """Unpickling this runs os.system: a weights-only loader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _image_folder(root: Path, classes: list[str], per_class: int = 2, splits=("train", "val")) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def _build_workspace(ws: Path) -> None:
    from edgeres import models

    (ws / "precious" / "sub").mkdir(parents=True)
    (ws / "precious" / "notes.txt").write_text("my notes\n")
    (ws / "precious" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (ws / "afile").write_text("a user's file\n")
    (ws / "user.png").write_bytes(b"\x89PNG\r\n\x1a\n not edgeres's")
    (ws / "nodata").mkdir()
    (ws / "cache").mkdir()

    torch.manual_seed(0)
    sd = models.create("resnet20").state_dict()
    torch.save(sd, ws / "good.pt")
    torch.save(models.create("resnet32").state_dict(), ws / "resnet32.pt")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, ws / "nan.pt")
    inf = {k: v.clone() for k, v in sd.items()}
    inf["bn1.running_var"][3] = float("inf")
    torch.save(inf, ws / "inf_bn.pt")
    torch.save({"state_dict": [1, 2, 3]}, ws / "list_state.pt")
    torch.save([1, 2, 3], ws / "a_list.pt")
    torch.save({"state_dict": {k: v for k, v in sd.items()}, "hook": _Hostile(ws / "pwned")}, ws / "hostile.pt")
    (ws / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 100)
    full = (ws / "good.pt").read_bytes()
    (ws / "truncated.pt").write_bytes(full[: len(full) // 2])

    _image_folder(ws / "two_classes", ["cat", "dog"])
    _image_folder(ws / "ten_bad", [f"c{i}" for i in range(10)], per_class=1)
    (ws / "ten_bad" / "val" / "c3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is no image")
    for split in ("train", "val"):
        for i in range(10):
            (ws / "empty_set" / split / f"c{i}").mkdir(parents=True)
    (ws / "no_classes" / "train").mkdir(parents=True)
    (ws / "no_classes" / "val").mkdir(parents=True)
    cifar = ws / "bad_cifar" / "cifar-10-batches-py"  # the right names, the wrong bytes (a truncated download)
    cifar.mkdir(parents=True)
    for name in ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))):
        (cifar / name).write_bytes(b"\x80\x02}q\x00" + b"x" * 100)

    _tiny_onnx(ws / "tiny.onnx")
    onnx_bytes = (ws / "tiny.onnx").read_bytes()
    (ws / "truncated.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    (ws / "text.onnx").write_text("this is a text file named .onnx\n")
    (ws / "empty.onnx").write_bytes(b"")
    (ws / "fake.xml").write_text("<net name='fake'><layers><layer")
    (ws / "fake.bin").write_bytes(b"\0" * 64)
    (ws / "lonely.xml").write_text("<?xml version='1.0'?><net name='x' version='11'></net>")
    (ws / "fake.engine").write_bytes(os.urandom(256))
    (ws / "notes.txt").write_text("no runtime runs this\n")

    (ws / "bad_report").mkdir()
    (ws / "bad_report" / "report.json").write_text("{not json")
    (ws / "binary_report").mkdir()
    (ws / "binary_report" / "report.json").write_bytes(b"\xff\xfe\x00garbage")
    bundle = ws / "bad_bundle"  # an edgeres export folder whose build record is damaged
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"format": "edgeres-export/1", "model": "resnet20"}')
    (bundle / "build.json").write_text("{damaged")
    (bundle / "model.onnx").write_bytes(onnx_bytes)
    export = ws / "bad_manifest"  # an artifact without its own metadata (eval reads that, never the manifest)
    export.mkdir()
    (export / "model.onnx").write_bytes(onnx_bytes)
    (export / "manifest.json").write_text("[1, 2")

    (ws / "a_run").mkdir()  # a training run: an export must not replace it
    (ws / "a_run" / ".edgeres").write_text('{"made_by": "edgeres", "kind": "train-run"}')
    (ws / "a_run" / "last.pt").write_bytes(b"hours of training")
    (ws / "an_export").mkdir()  # an export folder: a training run must not be written into it
    (ws / "an_export" / "manifest.json").write_text('{"format": "edgeres-export/1", "model": "resnet20"}')
    (ws / "bad.toml").write_text("name = 'x'\nruntime = \n")
    (ws / "missing_key.toml").write_text("name = 'x'\ndescription = 'no runtime'\n")
    (ws / "binary.toml").write_bytes(b"\xff\xfe\xfa")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("bad_inputs") / "ws"
    ws.mkdir()
    _build_workspace(ws)
    return ws


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- places that cannot be written


def _mount_tmpfs(at: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    at.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(at)], capture_output=True)
    return done.returncode == 0


def _umount(at: Path) -> None:
    subprocess.run(["umount", "-l", str(at)], capture_output=True)  # lazy: a handle left open cannot pin it
    with contextlib.suppress(OSError):
        at.rmdir()


@contextlib.contextmanager
def _read_only(ws: Path, mp: pytest.MonkeyPatch) -> Iterator[None]:
    """ws/ro: a read-only tmpfs as root (mode bits do not stop root), else a folder without write permission."""
    ro = ws / "ro"
    if _mount_tmpfs(ro, "ro,size=64k"):
        try:
            yield
        finally:
            _umount(ro)
        return
    if os.geteuid() == 0:
        pytest.skip("running as root without mount: no read-only place to test")
    ro.mkdir()
    ro.chmod(0o555)
    try:
        yield
    finally:
        ro.chmod(0o755)
        ro.rmdir()


@contextlib.contextmanager
def _full_disk(ws: Path, mp: pytest.MonkeyPatch) -> Iterator[None]:
    """ws/full: a 256 KiB tmpfs where the machine allows it, else every fsync fails with ENOSPC (simulated)."""
    full = ws / "full"
    if _mount_tmpfs(full, "size=256k"):
        try:
            yield
            assert [p.name for p in full.iterdir()] == [], "a full disk left debris"
        finally:
            _umount(full)
        return

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    full.mkdir()
    mp.setattr(os, "fsync", no_space)
    try:
        yield
    finally:
        mp.undo()
        shutil.rmtree(full)


# ---------------------------------------------------------------- the cases

R = ("--random-init", "--data", "synthetic")  # an export that gets as far as its output
CASES = [
    # model names and options
    Case("eval-unknown-model", ("eval", "resnet21"), "unknown model"),
    Case("export-bad-wrn-depth", ("export", "wrn-17-2", *R), "6n+4"),
    Case("export-no-weights", ("export", "resnet18", "--target", "jetson", "--int8"), "has no weights"),
    Case("eval-no-weights", ("eval", "resnet20", "--data", "synthetic"), "--random-init"),
    Case("eval-random-init-and-weights", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--random-init"),
         "--random-init", code=2),
    Case("export-int8-and-fp16", ("export", "resnet20", *R, "--int8", "--fp16"), "not both", code=2),
    Case("export-prune-out-of-range", ("export", "resnet20", *R, "--prune", "1.5"), "--prune must be"),
    Case("export-unknown-width-option", ("export", "resnet20", *R, "--width", "4"), "does not take the option"),
    Case("train-zero-epochs", ("train", "wrn-10-1", "--data", "synthetic", "--epochs", "0", "--out", "{ws}/run"),
         "epochs must be >= 1"),
    Case("fit-not-wrn", ("fit", "resnet"), "fit sizes Wide ResNets"),
    Case("fit-bad-depth", ("fit", "wrn", "--budget-mb", "64", "--depth", "17"), "6n+4"),
    # target profiles
    Case("export-unknown-target", ("export", "resnet20", *R, "--target", "no-such-board"), "unknown target"),
    Case("export-target-invalid-toml", ("export", "resnet20", *R, "--target", "{ws}/bad.toml"), "invalid TOML"),
    Case("export-target-missing-key", ("export", "resnet20", *R, "--target", "{ws}/missing_key.toml"),
         "missing_key.toml"),
    Case("check-target-binary", ("check", "{ws}/tiny.onnx", "--target", "{ws}/binary.toml"), "not a text"),
    Case("fit-unknown-target", ("fit", "wrn", "--target", "nowhere"), "unknown target"),
    Case("targets-no-profiles", ("targets",), "no target profiles found",
         setup=lambda ws, mp: _env(mp, EDGERES_TARGETS=str(ws / "nowhere"))),
    Case("export-fp16-on-cpu", ("export", "resnet20", *R, "--fp16"), "fp16"),
    # checkpoints
    Case("eval-hostile-pickle", ("eval", "resnet20", "--weights", "{ws}/hostile.pt"), "not a weights-only"),
    Case("eval-garbage-checkpoint", ("eval", "resnet20", "--weights", "{ws}/garbage.pt"), "corrupt"),
    Case("export-truncated-checkpoint", ("export", "resnet20", "--weights", "{ws}/truncated.pt"), "corrupt"),
    Case("eval-wrong-architecture", ("eval", "resnet20", "--weights", "{ws}/resnet32.pt"), "does not fit resnet20"),
    Case("export-nan-weight", ("export", "resnet20", "--weights", "{ws}/nan.pt"), "layer1.0.conv1.weight"),
    Case("eval-inf-bn-statistic", ("eval", "resnet20", "--weights", "{ws}/inf_bn.pt"), "bn1.running_var"),
    Case("train-nan-weights", ("train", "resnet20", "--weights", "{ws}/nan.pt", "--data", "synthetic", "--out",
                               "{ws}/run"), "non-finite"),
    Case("eval-missing-checkpoint", ("eval", "resnet20", "--weights", "{ws}/nope.pt"), "not found"),
    Case("eval-checkpoint-holds-list", ("eval", "resnet20", "--weights", "{ws}/a_list.pt"), "holds a list"),
    Case("eval-state-dict-not-tensors", ("eval", "resnet20", "--weights", "{ws}/list_state.pt"), "has no state_dict"),
    Case("export-new-head-untrained", ("export", "resnet20", "--weights", "{ws}/good.pt", "--num-classes", "2"),
         "would be untrained"),
    # data sets
    Case("eval-missing-data-path", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--data", "{ws}/nope"),
         "neither a known data set"),
    Case("eval-cifar-absent", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--data", "cifar10"),
         "no cifar10 data found"),
    Case("eval-truncated-cifar", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--data", "{ws}/bad_cifar"),
         "md5"),
    Case("eval-wrong-class-count", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--data", "{ws}/two_classes"),
         "has 2 classes, resnet20 has 10"),
    Case("export-wrong-class-count", ("export", "resnet20", "--weights", "{ws}/good.pt", "--data",
                                      "{ws}/two_classes", "--out", "{ws}/exp"), "--num-classes 2"),
    Case("train-wrong-class-count", ("train", "resnet20", "--weights", "{ws}/good.pt", "--data", "{ws}/two_classes",
                                     "--out", "{ws}/run"), "pass --num-classes 2"),
    Case("eval-undecodable-image", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--data", "{ws}/ten_bad"),
         "broken.png"),
    Case("eval-empty-data-set", ("eval", "resnet20", "--weights", "{ws}/good.pt", "--data", "{ws}/empty_set"),
         "has no images"),
    Case("train-no-class-folders", ("train", "wrn-10-1", "--data", "{ws}/no_classes", "--out", "{ws}/run"),
         "no class folders"),
    Case("export-calibration-set-unknown", ("export", "resnet20", *R, "--int8", "--calib-set", "nope"),
         "calibration set 'nope' not found"),
    # artifacts
    Case("bench-text-named-onnx", ("bench", "{ws}/text.onnx"), "not a readable ONNX model"),
    Case("bench-truncated-onnx", ("bench", "{ws}/truncated.onnx"), "not a readable ONNX model"),
    Case("bench-empty-onnx", ("bench", "{ws}/empty.onnx"), "no graph inside"),
    Case("eval-text-named-onnx", ("eval", "{ws}/text.onnx", "--data", "synthetic"), "not a readable ONNX model"),
    Case("check-truncated-onnx", ("check", "{ws}/truncated.onnx"), "not a readable ONNX model"),
    Case("bench-foreign-ir", ("bench", "{ws}/fake.xml"), "not a readable OpenVINO IR"),
    Case("bench-ir-without-bin", ("bench", "{ws}/lonely.xml"), "lonely.bin is missing"),
    Case("bench-garbage-engine", ("bench", "{ws}/fake.engine"), "fake.engine"),
    Case("bench-unknown-suffix", ("bench", "{ws}/notes.txt"), "cannot tell the runtime"),
    Case("bench-missing-artifact", ("bench", "{ws}/nope.onnx"), "not found"),
    Case("predict-artifact-without-metadata", ("predict", "{ws}/tiny.onnx", "{ws}/user.png"),
         "carries no edgeres metadata"),
    Case("predict-text-named-onnx", ("predict", "{ws}/text.onnx", "{ws}/user.png"), "not a readable ONNX model"),
    Case("predict-missing-artifact", ("predict", "{ws}/nope.onnx", "{ws}/user.png"), "not found"),
    Case("eval-artifact-without-metadata", ("eval", "{ws}/bad_manifest/model.onnx"), "carries no edgeres metadata"),
    Case("report-corrupt-json", ("report", "{ws}/bad_report"), "not an edgeres report"),
    Case("report-binary-json", ("report", "{ws}/binary_report"), "not an edgeres report"),
    Case("report-foreign-folder", ("report", "{ws}/precious"), "has no report.json"),
    Case("build-foreign-folder", ("build", "{ws}/precious"), "build.json"),
    Case("build-damaged-record", ("build", "{ws}/bad_bundle"), "damaged"),
    # output locations
    Case("export-out-foreign-folder", ("export", "resnet20", *R, "--out", "{ws}/precious"), "did not make"),
    Case("export-out-training-run", ("export", "resnet20", *R, "--out", "{ws}/a_run"), "holds a training run"),
    Case("train-out-export-folder", ("train", "wrn-10-1", "--data", "synthetic", "--out", "{ws}/an_export"),
         "holds an export folder"),
    Case("export-out-is-a-file", ("export", "resnet20", *R, "--out", "{ws}/afile"), "is a file"),
    Case("export-out-working-folder", ("export", "resnet20", *R, "--out", "."), "working folder"),
    Case("export-out-impossible", ("export", "resnet20", *R, "--out", "/proc/edgeres-x"), "cannot write"),
    Case("export-out-read-only", ("export", "resnet20", *R, "--out", "{ws}/ro/exp"), "cannot write",
         setup=lambda ws, mp: _read_only(ws, mp)),
    Case("train-out-foreign-folder", ("train", "wrn-10-1", "--data", "synthetic", "--out", "{ws}/precious"),
         "did not make"),
    Case("train-resume-foreign-folder", ("train", "wrn-10-1", "--data", "synthetic", "--resume", "--out",
                                         "{ws}/precious"), "did not make"),
    Case("train-out-is-a-file", ("train", "wrn-10-1", "--data", "synthetic", "--out", "{ws}/afile"), "is a file"),
    Case("train-out-impossible", ("train", "wrn-10-1", "--data", "synthetic", "--out", "/proc/edgeres-run"),
         "cannot write"),
    Case("fit-plot-is-a-folder", ("fit", "wrn", "--budget-mb", "64", "--plot", "{ws}/precious"), "is a folder"),
    Case("fit-plot-foreign-file", ("fit", "wrn", "--budget-mb", "64", "--plot", "{ws}/user.png"), "did not write"),
    Case("fit-plot-impossible", ("fit", "wrn", "--budget-mb", "64", "--plot", "/proc/edgeres.png"), "cannot write"),
    Case("train-full-disk", ("train", "wrn-10-1", "--data", "synthetic", "--epochs", "1", "--batch-size", "256",
                             "--out", "{ws}/full/run"), "no space left", setup=lambda ws, mp: _full_disk(ws, mp)),
]


@contextlib.contextmanager
def _env(mp: pytest.MonkeyPatch, **values: str) -> Iterator[None]:
    for k, v in values.items():
        mp.setenv(k, v)
    yield


def test_at_least_35_cases_cover_every_command():
    assert len(CASES) >= 35
    assert {c.argv[0] for c in CASES} >= {"bench", "eval", "check", "report", "build", "export", "train", "fit"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, template, tmp_path, monkeypatch, capsys):
    from edgeres.cli import main

    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("EDGERES_DATA", str(ws / "nodata"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(ws / "cache"))
    monkeypatch.setenv("EDGERES_NO_DOWNLOAD", "1")
    monkeypatch.delenv("EDGERES_DEBUG", raising=False)
    argv = [a.replace("{ws}", str(ws)) for a in case.argv]
    with case.setup(ws, monkeypatch) if case.setup else contextlib.nullcontext():
        before = _snapshot(ws)
        monkeypatch.setattr(sys, "argv", ["edgeres", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        after = _snapshot(ws)
    err = capsys.readouterr().err
    assert exc.value.code == case.code, err
    assert "Traceback" not in err, err
    assert case.needle in err, err
    if case.code == 1:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, err
        assert case.needle in errors[0], err
    assert sorted(set(after) - set(before)) == [], "new files appeared (half-written output)"
    assert sorted(set(before) - set(after)) == [], "pre-existing files disappeared"
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], f"pre-existing files changed: {changed}"
    assert not (ws / "pwned").exists()
