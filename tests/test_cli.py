import json

import pytest
from typer.testing import CliRunner

from edgeres.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_models_json_lists_every_family():
    res = run("models", "--json")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    names = {r["name"] for r in rows}
    assert {"resnet20", "resnet110", "resnet18", "resnet152", "wrn-16-4", "wrn-28-10"} <= names
    r20 = next(r for r in rows if r["name"] == "resnet20")
    assert r20["params"] == 269_722 and r20["macs"] > 40e6


def test_eval_json_on_subset(resnet20_weights):
    res = run("eval", "resnet20", "--weights", str(resnet20_weights), "--data", "cifar10", "--limit", "500",
              "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["total"] == 500 and doc["top1_accuracy"] + doc["top1_error"] == pytest.approx(100)
    assert {"top1_accuracy", "top1_error", "correct", "total"} <= set(doc)


@pytest.mark.slow
@pytest.mark.parametrize("name,acc", [("resnet20", 91.73), ("resnet32", 92.63), ("resnet44", 93.10),
                                      ("resnet56", 93.39)])
def test_eval_pretrained_full_test_split(data_root, name, acc):
    res = run("eval", f"{name}.cifar10_akamaster", "--data", "cifar10", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["top1_accuracy"] == acc


def _main_exit(monkeypatch, capsys, *argv):
    import sys

    from edgeres.cli import main

    monkeypatch.setattr(sys, "argv", ["edgeres", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["eval", "resnet21"], "unknown model"),
        (["eval", "wrn-17-2"], "6n+4"),
        (["eval", "resnet20", "--weights", "/nonexistent.pt"], "not found"),
        (["export", "resnet20", "--target", "no-such-board"], "no-such-board"),
        (["export", "resnet20", "--data", "synthetic", "--prune", "0.5", "--prune-epochs", "1",
          "--train-precision", "fp8"], "--train-precision"),
        (["report", "/nonexistent"], "report.json"),
    ],
)
def test_bad_input_is_one_line_exit_1(monkeypatch, capsys, argv, needle):
    code, cap = _main_exit(monkeypatch, capsys, *argv)
    assert code == 1
    assert "Traceback" not in cap.err and needle in cap.err
    assert len([ln for ln in cap.err.strip().splitlines() if ln.startswith("error:")]) == 1


def test_corrupt_checkpoint_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    code, cap = _main_exit(monkeypatch, capsys, "eval", "resnet20", "--weights", str(tmp_path / "bad.pt"))
    assert code == 1 and "corrupt" in cap.err and "Traceback" not in cap.err


def test_missing_data_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGERES_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, cap = _main_exit(monkeypatch, capsys, "eval", "resnet20", "--data", "cifar10", "--random-init")
    assert code == 1 and "EDGERES_DATA" in cap.err and "Traceback" not in cap.err


def test_usage_errors_keep_exit_2():
    assert run("bench", "x.onnx", "--batch", "a,b").exit_code == 2


def test_train_then_eval_checkpoint_through_cli(tmp_path):
    out = tmp_path / "run"
    res = run("train", "wrn-10-1", "--data", "synthetic", "--epochs", "1", "--batch-size", "64", "--out", str(out),
              "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["epochs"] == 1 and (out / "last.pt").is_file()
    res = run("eval", "wrn-10-1", "--weights", str(out / "last.pt"), "--data", "synthetic", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["top1_error"] == doc["final"]["top1_error"]


def test_train_quarter_resnet34_constant_lr_records_test_accuracy_per_epoch(tmp_path):
    out = tmp_path / "mini"
    res = run("train", "resnet34_quarter", "--data", "synthetic", "--subset", "64", "--epochs", "2",
              "--batch-size", "32", "--lr", "0.01", "--schedule", "constant", "--momentum", "0.9", "--device", "cpu",
              "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["lr"] for h in history] == [0.01, 0.01]  # no decay
    assert all(0 <= h["test"]["top1_accuracy"] <= 100 and h["test"]["total"] > 0 for h in history)
    assert json.loads(res.stdout)["history"] == history
    assert run("train", "resnet34_quarter", "--schedule", "linear", "--out", str(tmp_path / "x")).exit_code == 2


def test_targets_and_check_commands(tmp_path):
    res = run("targets", "--json")
    assert res.exit_code == 0
    names = {t["name"] for t in json.loads(res.stdout)}
    assert {"cpu", "jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano",
            "jetson-orin-nx", "jetson-agx-orin", "gpu-tensorrt"} <= names


def test_sigterm_leaves_no_partial_output(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "exp"
    env = {**os.environ, "EDGERES_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeres.cli", "export", "resnet20", "--data", "synthetic",
                             "--random-init", "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".exp.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert any(p.name.startswith(".exp.") for p in tmp_path.iterdir()), "export never started writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_swept_by_the_next_run(tmp_path):
    """SIGKILL cannot be caught: the temp folder stays, named with the dead pid, and the next write beside it
    removes it; a user's look-alike file is never touched."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from edgeres.io import atomic_dir

    out = tmp_path / "exp"
    (tmp_path / ".exp.notes").write_text("the user's")
    env = {**os.environ, "EDGERES_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeres.cli", "export", "resnet20", "--data", "synthetic",
                             "--random-init", "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    prefix = f".exp.edgeres-{proc.pid}-"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(prefix) for p in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(prefix)]
    assert left, "the killed export left no temp folder to sweep (it never started writing?)"
    with atomic_dir(out) as d:
        (d / "model.onnx").write_text("next run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exp.notes", "exp"]
    assert (tmp_path / ".exp.notes").read_text() == "the user's"


def test_transfer_learning_at_224_px_carries_the_folder_class_names(tmp_path):
    """resnet18.<tag> --num-classes N --data FOLDER: new head, fine-tuning recipe, 224 px crops, names travel.

    The ImageNet weights are a torchvision-layout checkpoint of random weights made here (none exist on
    this machine): the mechanics are real, no accuracy is."""
    import torch
    from PIL import Image

    from edgeres import models
    from edgeres.latency import BenchOptions
    from edgeres.pipeline import ExportOptions, export

    torch.manual_seed(0)
    tv = tmp_path / "resnet18-random.pth"
    torch.save(models.create("resnet18", num_classes=1000, input_size=224).state_dict(), tv)
    tree = tmp_path / "flowers"
    for split in ("train", "val"):
        for c, cls in enumerate(("daisy", "rose")):
            (tree / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (96 + 10 * i, 64), (200 * c, 100, 50 + 20 * i)).save(tree / split / cls / f"{i}.jpg")
    out = tmp_path / "run"
    res = run("train", "resnet18.imagenet1k_v1", "--weights", str(tv), "--num-classes", "2", "--data", str(tree),
              "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["classes"] == ["daisy", "rose"] and doc["history"][0]["lr"] == 0.01  # the fine-tuning recipe
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["train_config"]["schedule"] == "cosine"
    cfg = state["cfg"]
    assert cfg["classes"] == ["daisy", "rose"] and cfg["input_size"] == 224 and cfg["num_classes"] == 2
    assert cfg["preprocess"]["resize_shorter_side"] == 256 and cfg["preprocess"]["center_crop"] == 224
    assert cfg["preprocess"]["train_augment"] == "random_resized_crop_flip"
    assert "resnet18.imagenet1k_v1" in cfg["weights"]

    opts = ExportOptions(eval_limit=2, bench=BenchOptions(batch_sizes=(1,), warmup=1, runs=2))
    report = export(None, weights=out / "last.pt", data_spec=str(tree), out=tmp_path / "exp", options=opts)
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["classes"] == ["daisy", "rose"] and manifest["input_shape"][-1] == 224
    assert report.rows[0].eval_images == 2


def test_a_second_export_into_the_same_folder_stops_and_a_clean_run_prints_no_library_noise(tmp_path):
    """Two real processes: the second names the first and exits 1; the first finishes whole, and its stderr holds
    edgeres's progress only (no exporter UserWarning, NNCF INFO, torchao or torch log lines)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "exp"
    env = {k: v for k, v in os.environ.items() if k not in ("EDGERES_DEBUG", "EDGERES_QUIET")}
    cmd = [sys.executable, "-m", "edgeres.cli", "export", "resnet20", "--data", "synthetic", "--random-init",
           "--int8", "--calib", "64", "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (tmp_path / ".exp.edgeres.lock").exists() and first.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / ".exp.edgeres.lock").exists(), "the first export never started writing"
        first.send_signal(signal.SIGSTOP)  # hold it mid-write, however slow the second is to start
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.strip().splitlines() if line.startswith("error: --out ")]
    assert f"is being written by edgeres process {first.pid} (cli.py export resnet20" in second.stderr
    assert first.returncode == 0, stderr
    assert (out / "manifest.json").is_file() and "int8" in stdout
    noise = [line for line in stderr.splitlines()
             if any(word in line for word in ("Warning", "INFO:", "site-packages", "Failed to load", "triton"))]
    assert noise == [], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no lock file, no temp folder left
