"""Training and evaluation: one epoch, evaluation, and the paper recipe (He et al. 2015, sec. 4.2).

`train_model` runs SGD with momentum 0.9, lr 0.1, batch 128 and lr /10 at 50% and 75% of the
iterations (the paper's 32k and 48k of 64k), or a cosine schedule, or a constant lr. It runs on
the GPU when there is one (or `device`); each epoch's test top-1 goes into the history. Every epoch it
writes `last.pt` (weights plus optimizer, scheduler, RNG and history) so `resume=True` continues to
bitwise the same weights; `best.pt` is a plain edgeres checkpoint of the best test accuracy.
Under torchrun (WORLD_SIZE > 1) it trains with DistributedDataParallel, each process on its
shard of the data; only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from edgeres.checkpoint import checkpoint_dict, save_checkpoint
from edgeres.data import AnyDataset, batches, num_batches
from edgeres.errors import CheckpointError, EdgeresError
from edgeres.evaluate import EvalResult, evaluate, result_from_counts
from edgeres.finetune import run_epoch
from edgeres.io import MARKER, atomic_write, check_output_dir, made_by_edgeres, output_lock, write_marker
from edgeres.progress import info

SCHEDULES = ("step", "cosine", "constant")
STEP_POINTS = (0.5, 0.75)  # lr /10 at 32k and 48k of 64k iterations (He et al. 2015, sec. 4.2)
WEIGHT_DECAY = {"wrn": 5e-4}  # Zagoruyko & Komodakis 2016; every other family uses the ResNet paper's 1e-4
DEFAULT_WEIGHT_DECAY = 1e-4
STATE = "edgeres-train-state/1"
NOT_COMPARED = ("device",)  # config fields that may change between a run and its resume






@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the CIFAR ResNet paper's (~64k iterations at batch 128)."""

    epochs: int = 164
    batch_size: int = 128  # per process (global = batch_size * world_size)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None  # None -> 5e-4 for model.cfg.family == "wrn", else 1e-4
    schedule: str = "step"  # "step" (/10 at 50% and 75%) | "cosine" | "constant" (no decay)
    warmup_epochs: int = 0
    seed: int = 0
    eval_every: int = 1  # evaluate on the test set every N epochs (and at the end)
    device: str | None = None  # None -> cuda if available else cpu

    def to_dict(self) -> dict:
        return asdict(self)


FINE_TUNE = TrainConfig(epochs=15, batch_size=64, lr=0.01, schedule="cosine")  # from pretrained weights


def recipe(*, pretrained: bool, **given) -> TrainConfig:
    """The paper recipe from scratch, or the fine-tuning one (lr 0.01, cosine, 15 epochs, batch 64) from
    pretrained weights; options given (not None) override either."""
    return replace(FINE_TUNE if pretrained else TrainConfig(), **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    final: EvalResult
    best_accuracy: float
    checkpoint: Path
    history: list[dict]

    def to_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "final": self.final.to_dict(),
            "best_accuracy": self.best_accuracy,
            "checkpoint": str(self.checkpoint),
            "history": self.history,
        }


# ---------------------------------------------------------------- one epoch, evaluation










# ---------------------------------------------------------------- the recipe's pieces


def default_weight_decay(model: nn.Module) -> float:
    """5e-4 for Wide ResNets (their paper), 1e-4 for ResNets (He et al. 2015)."""
    return WEIGHT_DECAY.get(model.cfg.family, DEFAULT_WEIGHT_DECAY)


def lr_factor(iteration: int, total: int, *, schedule: str = "step", warmup: int = 0) -> float:
    """Multiplier of the base lr at `iteration` (0-based) of `total`; linear warm-up over `warmup`."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    if schedule == "step":
        return 0.1 ** sum(iteration >= int(p * total) for p in STEP_POINTS)
    if schedule == "constant":
        return 1.0
    progress_ = (iteration - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR following `lr_factor` over cfg.epochs * iters_per_epoch iterations."""
    total, warmup = cfg.epochs * iters_per_epoch, cfg.warmup_epochs * iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total, schedule=cfg.schedule, warmup=warmup)
    )


def _check_config(cfg: TrainConfig) -> None:
    problems = []
    if cfg.epochs < 1:
        problems.append(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        problems.append(f"batch size must be >= 1, got {cfg.batch_size}")
    if cfg.lr <= 0:
        problems.append(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        problems.append(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        problems.append(f"weight decay must be >= 0, got {cfg.weight_decay}")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0 <= cfg.warmup_epochs < max(cfg.epochs, 1):
        problems.append(f"warmup epochs must be in [0, epochs), got {cfg.warmup_epochs}")
    if cfg.eval_every < 1:
        problems.append(f"eval every must be >= 1 epoch, got {cfg.eval_every}")
    if problems:
        raise EdgeresError("bad training options: " + "; ".join(problems))


def _pick_device(requested: str | None) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise EdgeresError(f"unknown device {requested!r}; pass cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgeresError("device cuda asked for but no GPU is available; pass --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    return device


def _start_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, started_here): joins torchrun's group when WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise EdgeresError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed; run one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _sum_across(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _shard(ds: AnyDataset, rank: int, world: int) -> AnyDataset:
    """Every world-th image from `rank`, unpadded, so evaluation counts each image once."""
    if world == 1:
        return ds
    return ds.take(torch.arange(rank, len(ds), world))


def _evaluate(model: nn.Module, ds: AnyDataset, cfg: TrainConfig, device: torch.device, rank: int, world: int,
              desc: str) -> EvalResult:
    part = _shard(ds, rank, world)
    cuda = device.type == "cuda"
    res = evaluate(
        model, batches(part, cfg.batch_size, mean=model.cfg.mean, std=model.cfg.std),
        total=num_batches(part, cfg.batch_size), desc=desc, device=device, channels_last=cuda, amp=cuda,
        show=rank == 0,
    )
    correct, total, loss_sum = _sum_across([res.correct, res.total, res.loss * res.total], device, world)
    return result_from_counts(round(correct), round(total), loss_sum)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _gather_rng(device: torch.device, world: int) -> list[dict]:
    """Every process's RNG state (dropout), so a resumed run draws the same numbers on every rank."""
    mine = _rng_state(device)
    if world == 1:
        return [mine]
    states: list = [None] * world
    dist.all_gather_object(states, {k: v.cpu() for k, v in mine.items()})
    return states


def _set_rng(states: list[dict], rank: int, device: torch.device) -> None:
    state = states[rank]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def data_fingerprint(ds: AnyDataset) -> dict:
    """What identifies the training data for resume: name, shape and a hash of the labels."""
    labels = hashlib.sha256(ds.labels.cpu().numpy().tobytes()).hexdigest()
    return {"name": ds.name, "images": len(ds), "shape": ds.image_shape, "labels_sha256": labels}


# ---------------------------------------------------------------- resume


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume: {path} does not exist; start without --resume or pass the run's --out"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(f"cannot resume from {path}: unreadable training checkpoint ({first})") from exc
    if not isinstance(state, dict) or state.get("train_state") != STATE:
        raise CheckpointError(f"cannot resume from {path}: not an edgeres training checkpoint (last.pt)")
    return state


def _differences(saved: dict, now: dict, skip: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{key} {saved.get(key)!r} in last.pt, {now.get(key)!r} now"
        for key in sorted(set(saved) | set(now))
        if key not in skip and saved.get(key) != now.get(key)
    ]


def _check_resumable(state: dict, path: Path, model: nn.Module, pruned: dict | None, run_cfg: dict,
                     data: dict, world: int) -> None:
    """Raise naming what differs between the saved run and this one; resuming must continue it exactly."""
    if state.get("model") != model.cfg.name:
        raise EdgeresError(
            f"cannot resume {path}: it trains {state.get('model')}, not {model.cfg.name}; "
            "pass the same MODEL or choose another --out"
        )
    diffs = _differences(state.get("cfg") or {}, model.cfg.to_dict())
    if (state.get("pruned") or None) != (pruned or None):
        diffs.append("pruned layer shapes differ")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
    if not diffs and own != saved:
        diffs.append("state_dict keys or shapes differ")
    if diffs:
        raise EdgeresError(
            f"cannot resume {path}: the model differs ({'; '.join(diffs)}); pass the same model options"
        )
    diffs = _differences(state.get("train_config") or {}, run_cfg, skip=NOT_COMPARED)
    if state.get("world_size") != world:
        diffs.append(f"processes {state.get('world_size')} in last.pt, {world} now")
    if diffs:
        raise EdgeresError(
            f"cannot resume {path}: the training options differ ({'; '.join(diffs)}); "
            "pass the same options or choose another --out"
        )
    diffs = _differences(state.get("data") or {}, data)
    if diffs:
        raise EdgeresError(
            f"cannot resume {path}: the training data differ ({'; '.join(diffs)}); pass the same --data"
        )


def _eval_from_dict(d: dict) -> EvalResult:
    return EvalResult(int(d["correct"]), int(d["total"]), float(d["top1_accuracy"]), float(d["top1_error"]),
                      float(d["loss"]))


def _final_eval(history: list[dict]) -> EvalResult:
    for entry in reversed(history):
        if entry.get("test"):
            return _eval_from_dict(entry["test"])
    raise CheckpointError("the saved history holds no evaluation; the run's last.pt is incomplete")


# ---------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class _Run:
    """One process's part in a training run: where it trains and what it writes."""

    cfg: TrainConfig
    saved_cfg: dict  # cfg with the weight decay resolved, as last.pt records it
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    pruned: dict | None
    extra: dict
    data: dict

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"


RUN_KIND = "train-run"


def is_run_folder(path: Path) -> bool:
    """A training run folder: edgeres's marker, or (runs made before markers) last.pt beside an epoch history."""
    if made_by_edgeres(path, RUN_KIND):
        return True
    try:
        history = json.loads((Path(path) / "history.json").read_text())
    except (OSError, ValueError):
        return False
    return (Path(path) / "last.pt").is_file() and isinstance(history, list) and all(
        isinstance(e, dict) and "epoch" in e and "train_loss" in e for e in history)


def check_run_folder(out_dir: str | os.PathLike) -> Path:
    """`out_dir` if a run may be written there (new, empty or a run folder); else one error naming the way out."""
    return check_output_dir(out_dir, kind=RUN_KIND, ours=is_run_folder)


def train_model(
    model: nn.Module,
    train_ds: AnyDataset,
    test_ds: AnyDataset,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    extra_checkpoint: dict | None = None,
) -> TrainResult:
    """Train `model` in place with the paper recipe; write out_dir/{last.pt, best.pt, history.json}.

    `resume=True` continues out_dir/last.pt to the same weights an uninterrupted run reaches. The
    model's initial weights are the caller's: seed before building it for a reproducible start.
    The result's checkpoint is last.pt (the final weights, loadable by checkpoint.load_model).
    """
    _check_config(cfg)
    if len(train_ds) == 0 or len(test_ds) == 0:
        raise EdgeresError("the training and test data must not be empty; check --data")
    out_dir = check_run_folder(out_dir)
    if not resume and (out_dir / "last.pt").exists():
        raise EdgeresError(
            f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )
    device = _pick_device(cfg.device)
    rank, world, started = _start_distributed(device)
    wd = cfg.weight_decay if cfg.weight_decay is not None else default_weight_decay(model)
    run = _Run(cfg, replace(cfg, weight_decay=wd).to_dict(), device, rank, world, out_dir,
               getattr(model, "edgeres_pruned", None), dict(extra_checkpoint or {}), data_fingerprint(train_ds))
    created = not out_dir.exists()
    try:
        with output_lock(out_dir) if rank == 0 else contextlib.nullcontext():  # rank 0 writes; one run per folder
            return _train(model, train_ds, test_ds, run, resume)
    except BaseException:
        if created and rank == 0:
            _remove_if_empty_run(out_dir)
        raise
    finally:
        if started:
            dist.destroy_process_group()


def _remove_if_empty_run(out_dir: Path) -> None:
    """A run folder this call created and that holds nothing but its marker goes again: no debris on failure."""
    with contextlib.suppress(OSError):
        if {p.name for p in out_dir.iterdir()} <= {MARKER}:
            shutil.rmtree(out_dir)


def _train(model: nn.Module, train_ds: AnyDataset, test_ds: AnyDataset, run: _Run, resume: bool) -> TrainResult:
    cfg, device, rank, world = run.cfg, run.device, run.rank, run.world
    state = _read_state(run.last) if resume else None
    if state is not None:
        _check_resumable(state, run.last, model, run.pruned, run.saved_cfg, run.data, world)
    if rank == 0 and not made_by_edgeres(run.out_dir, RUN_KIND):
        try:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            write_marker(run.out_dir, RUN_KIND)  # so a later run may fill or resume it, never a user's folder
        except OSError as exc:
            raise EdgeresError(f"cannot write {run.out_dir}: {exc.strerror}; pass another --out") from exc
    if state is not None:
        model.load_state_dict(state["state_dict"])
        if state["epoch"] >= cfg.epochs:  # already complete: nothing to train
            history = list(state["history"])
            return TrainResult(state["epoch"], _final_eval(history), float(state["best_accuracy"]), run.last,
                               history)

    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed + rank)  # dropout; the data order comes from batches(seed, epoch)
    if cuda:
        model.to(device, memory_format=torch.channels_last)
    iters = num_batches(train_ds, cfg.batch_size, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=run.saved_cfg["weight_decay"])
    scheduler = make_scheduler(optimizer, cfg, iters)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    start, best, history = 0, -1.0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng(state["rng"], rank, device)
        start, best, history = int(state["epoch"]), float(state["best_accuracy"]), list(state["history"])
        if rank == 0:
            info(f"resuming {run.last} at epoch {start + 1}/{cfg.epochs}")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    final = None
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        stats = run_epoch(
            net,
            batches(train_ds, cfg.batch_size, mean=model.cfg.mean, std=model.cfg.std, train=True,
                    seed=cfg.seed, epoch=epoch, rank=rank, world=world),
            optimizer, scheduler, total=iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", device=device,
            scaler=scaler, channels_last=cuda, show=rank == 0,
        )
        if world > 1:  # BN running stats differ per rank after the last step: keep rank 0's everywhere
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        loss_sum, correct, seen = _sum_across(
            [stats.loss * stats.images, stats.accuracy * stats.images / 100, stats.images], device, world
        )
        entry = {
            "epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
            "train_accuracy": 100 * correct / seen, "train_images": round(seen), "iterations": iters,
            "test": None,
        }
        improved = False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            final = _evaluate(model, test_ds, cfg, device, rank, world, desc=f"test {epoch + 1}/{cfg.epochs}")
            entry["test"] = final.to_dict()
            improved = final.top1_accuracy > best
            best = max(best, final.top1_accuracy)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(entry)
        training_state = {
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": _gather_rng(device, world),
            "history": history, "best_accuracy": best,
        }
        if rank == 0:
            _write_epoch(run, model, training_state, improved)
    if final is None:
        final = _final_eval(history)
    return TrainResult(cfg.epochs, final, best, run.last, history)


def _write_epoch(run: _Run, model: nn.Module, training_state: dict, improved: bool) -> None:
    """best.pt (if improved), history.json, then last.pt: each whole or not at all."""
    history = training_state["history"]
    entry, best = history[-1], training_state["best_accuracy"]
    test = entry["test"]
    if improved:
        save_checkpoint(run.out_dir / "best.pt", model, pruned=run.pruned,
                        extra={**run.extra, "epoch": entry["epoch"], "test": test, "train_config": run.saved_cfg})
    with atomic_write(run.out_dir / "history.json") as tmp:
        tmp.write_text(json.dumps(history, indent=1) + "\n")
    state = checkpoint_dict(model, pruned=run.pruned, extra=run.extra)
    state.update(training_state, train_state=STATE, train_config=run.saved_cfg, data=run.data,
                 world_size=run.world)
    with atomic_write(run.last) as tmp:
        torch.save(state, tmp)
    line = (f"epoch {entry['epoch']}  lr {entry['lr']:.4g}  loss {entry['train_loss']:.4f}  "
            f"train {entry['train_accuracy']:.2f}%")
    if test:
        line += f"  test {test['top1_accuracy']:.2f}% (best {best:.2f}%)"
    info(line + f"  {entry['seconds']:.1f}s")


def run_data_name(run: str | os.PathLike) -> str:
    """The data set a run folder's model trained on, as its last.pt records it; "unknown" when it cannot tell."""
    last = Path(run) / "last.pt"
    if not last.is_file():
        return "unknown"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (the data name is informative only)
        return "unknown"
    return str((state.get("data") or {}).get("name", "unknown")) if isinstance(state, dict) else "unknown"
