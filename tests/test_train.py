"""The training recipe: loss goes down, resume is exact, DDP agrees across ranks, schedule and errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgeres import models, train
from edgeres.checkpoint import load_model, read_checkpoint
from edgeres.data import batches, load_dataset, subset, synthetic
from edgeres.errors import CheckpointError, EdgeresError
from edgeres.train import TrainConfig, default_weight_decay, lr_factor, make_scheduler, train_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Other jobs share this machine's cores; one intra-op thread keeps these runs predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str = "resnet20", seed: int = 0, **opts) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(name, **opts)


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, TrainConfig, train.TrainResult]:
    """One finished epoch of resnet20 on 64 synthetic images."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, device="cpu")
    result = train_model(_model(), synthetic(64), synthetic(32, split="test"), cfg, out)
    return out, cfg, result


# ---------------------------------------------------------------- (1) real data


@pytest.mark.data
def test_training_lowers_loss_on_cifar_subset(tmp_path):
    root = os.environ.get("EDGERES_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py").is_dir():
        pytest.skip("set EDGERES_DATA to a folder holding cifar-10-batches-py/")
    train_ds = subset(load_dataset("cifar10", "train"), 512, seed=0)
    test_ds = subset(load_dataset("cifar10", "test"), 256, seed=0)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, eval_every=3, device="cpu")
    result = train_model(_model(), train_ds, test_ds, cfg, tmp_path / "run")

    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert [h["test"] is not None for h in result.history] == [False, False, True]
    assert result.final.total == 256 and result.best_accuracy == result.final.top1_accuracy
    # best.pt is a plain checkpoint: it rebuilds the model by itself and scores what was recorded
    best = load_model(None, weights=tmp_path / "run" / "best.pt")
    again = train.evaluate(best, batches(test_ds, 128, mean=best.cfg.mean, std=best.cfg.std))
    assert again.correct == result.final.correct


# ---------------------------------------------------------------- (2) resume is exact


def test_resume_after_interrupt_is_bitwise_identical(tmp_path, monkeypatch):
    # Dropout makes the RNG state part of what resume must restore.
    train_ds, test_ds = synthetic(128, seed=3), synthetic(32, seed=3, split="test")
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu")
    full = _model("wrn-10-1", dropout=0.3)
    train_model(full, train_ds, test_ds, cfg, tmp_path / "full")

    real_batches = train.batches

    def interrupted(*args, epoch=0, **kwargs):  # Ctrl-C after two steps of the second epoch
        for i, item in enumerate(real_batches(*args, epoch=epoch, **kwargs)):
            if epoch == 1 and i == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(train, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_model(_model("wrn-10-1", dropout=0.3), train_ds, test_ds, cfg, tmp_path / "cut")
    monkeypatch.setattr(train, "batches", real_batches)
    assert _load_state(tmp_path / "cut" / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [".edgeres", "best.pt", "history.json", "last.pt"]

    resumed = _model("wrn-10-1", seed=123, dropout=0.3)  # a new process: other initial weights
    result = train_model(resumed, train_ds, test_ds, cfg, tmp_path / "cut", resume=True)

    _assert_same_tensors(full.state_dict(), resumed.state_dict())
    a, b = _load_state(tmp_path / "full" / "last.pt"), _load_state(tmp_path / "cut" / "last.pt")
    _assert_same_tensors(a["state_dict"], b["state_dict"])
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in a["history"]]
    assert b["epoch"] == 2 and a["optimizer"]["param_groups"][0]["weight_decay"] == 5e-4  # WRN default


# ---------------------------------------------------------------- (3) DDP on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), EDGERES_QUIET="1")
    model = _model(seed=100 + rank)  # different initial weights per rank: DDP must start from rank 0's
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, device="cpu")
    result = train_model(model, synthetic(128), synthetic(64, split="test"), cfg, out / "run")
    torch.save({"init": init, "final": model.state_dict(), "result": result.to_dict(),
                "group_left": not dist.is_initialized()}, out / f"rank{rank}.pt")


def test_ddp_two_cpu_processes_agree(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    r0, r1 = (_load_state(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["init"]["conv1.weight"], r1["init"]["conv1.weight"])
    _assert_same_tensors(r0["final"], r1["final"])  # parameters and BN buffers
    assert not torch.equal(r0["final"]["conv1.weight"], r0["init"]["conv1.weight"])
    _assert_same_tensors(r0["final"], _load_state(tmp_path / "run" / "last.pt")["state_dict"])
    for r in (r0, r1):
        epoch = r["result"]["history"][0]
        assert epoch["iterations"] == 4  # 64 images per rank (half the data) / batch 16
        assert epoch["train_images"] == 128  # counted across both ranks
        assert r["result"]["final"]["total"] == 64  # every test image once, none twice
        assert r["group_left"]
    assert r0["result"]["final"] == r1["result"]["final"]
    assert _load_state(tmp_path / "run" / "last.pt")["world_size"] == 2


def _pruned_resnet20() -> torch.nn.Module:
    """resnet20 with its first block's inner width cut from 16 to 8, as the compress step leaves it."""
    from edgeres.compress.prune import pruned_spec

    model = _model()
    block = model.layer1[0]
    block.conv1, block.bn1 = torch.nn.Conv2d(16, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
    block.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    model.edgeres_pruned = pruned_spec(model)
    return model


def test_checkpoints_are_plain_files_that_rebuild_the_model(tmp_path):
    model = _pruned_resnet20()
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu")
    result = train_model(model, synthetic(64), synthetic(32, split="test"), cfg, tmp_path,
                         extra_checkpoint={"data": "synthetic"})
    assert result.checkpoint == tmp_path / "last.pt"
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    for name in ("last.pt", "best.pt"):
        assert read_checkpoint(tmp_path / name).extra["data"] == "synthetic"
        loaded = load_model(None, weights=tmp_path / name)  # rebuilds the pruned shapes by itself
        assert loaded.layer1[0].conv1.out_channels == 8
        _assert_same_tensors(loaded.state_dict(), model.state_dict())


# ---------------------------------------------------------------- (4) weight decay per family


def test_weight_decay_default_per_family(tiny_run):
    assert default_weight_decay(models.create("resnet20")) == 1e-4
    assert default_weight_decay(models.create("resnet18")) == 1e-4
    assert default_weight_decay(models.create("wrn-10-1")) == 5e-4
    out, _, _ = tiny_run
    state = _load_state(out / "last.pt")
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    assert state["train_config"]["weight_decay"] == 1e-4


# ---------------------------------------------------------------- (5) schedules


def test_step_and_cosine_lr_at_known_iterations():
    total = 64_000  # the paper's 64k iterations: /10 at 32k and 48k
    step = {it: lr_factor(it, total) for it in (0, 31_999, 32_000, 47_999, 48_000, 63_999)}
    assert step == pytest.approx({0: 1, 31_999: 1, 32_000: 0.1, 47_999: 0.1, 48_000: 0.01, 63_999: 0.01})
    cos = [lr_factor(it, total, schedule="cosine") for it in (0, 16_000, 32_000, 64_000)]
    assert cos == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.0])
    assert lr_factor(0, total, warmup=400) == pytest.approx(1 / 400)
    assert lr_factor(399, total, schedule="cosine", warmup=400) == pytest.approx(1.0)
    assert [lr_factor(it, total, schedule="constant") for it in (0, 32_000, 63_999)] == [1.0, 1.0, 1.0]

    # The real scheduler steps per iteration: 4 epochs of 2 iterations, drops after 4 and 6 steps.
    for schedule, expected in (
        ("step", [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]),
        ("cosine", [0.1 * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)]),
        ("constant", [0.1] * 8),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make_scheduler(opt, TrainConfig(epochs=4, schedule=schedule), iters_per_epoch=2)
        seen = []
        for _ in range(8):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert seen == pytest.approx(expected), schedule


# ---------------------------------------------------------------- (6) resume errors


def test_resume_errors_name_what_differs(tiny_run, tmp_path, monkeypatch):
    src, cfg, done = tiny_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    tr, te = synthetic(64), synthetic(32, split="test")

    with pytest.raises(CheckpointError, match="last.pt does not exist"):
        train_model(_model(), tr, te, cfg, tmp_path / "empty", resume=True)
    with pytest.raises(EdgeresError, match="--resume"):
        train_model(_model(), tr, te, cfg, out)
    with pytest.raises(EdgeresError, match=r"options differ \(lr 0.05 in last.pt, 0.1 now"):
        train_model(_model(), tr, te, TrainConfig(epochs=1, batch_size=32, device="cpu"), out, resume=True)
    with pytest.raises(EdgeresError, match="trains resnet20, not wrn-10-1"):
        train_model(_model("wrn-10-1"), tr, te, cfg, out, resume=True)
    with pytest.raises(EdgeresError, match="num_classes 10 in last.pt, 5 now"):
        train_model(_model(num_classes=5), tr, te, cfg, out, resume=True)
    with pytest.raises(EdgeresError, match="training data differ"):
        train_model(_model(), synthetic(64, seed=9), te, cfg, out, resume=True)
    with pytest.raises(EdgeresError, match="schedule must be one of step, cosine"):
        train_model(_model(), tr, te, TrainConfig(schedule="linear"), tmp_path / "bad")

    # A finished run resumes to its result without another step.
    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "run_epoch", no_training)
    model = _model(seed=7)
    again = train_model(model, tr, te, cfg, out, resume=True)
    assert again.final == done.final and again.history == done.history
    _assert_same_tensors(model.state_dict(), _load_state(out / "last.pt")["state_dict"])
