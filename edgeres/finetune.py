"""The one fine-tuning loop: SGD with momentum and a cosine learning rate for a few epochs, one `run_epoch` each.

Pruning recovery (pipeline) and quantization-aware training (`compress.quantize.qat`) run `finetune`; the
paper recipe with checkpoints and resume (`edgeres.train`) runs the same `run_epoch`. Mixed precision:
float16 with a GradScaler (CUDA) or bfloat16 autocast (CPUs with native bf16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from edgeres.errors import ModelError
from edgeres.progress import progress


@dataclass(frozen=True)
class FinetuneOptions:
    """SGD settings of a fine-tune; `device` and `bf16` say where and in what math it runs."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bf16: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int


@contextlib.contextmanager
def step_bar(desc: str, total: int | None, show: bool) -> Iterator[Callable[[str], None]]:
    """Yield `advance(status)`; a bar on stderr only where `show` (rank 0)."""
    if not show:
        yield lambda status: None
        return
    with progress() as bar:
        task = bar.add_task(desc, total=total, status="")
        yield lambda status: bar.update(task, advance=1, status=status)


def run_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    total: int | None = None,
    desc: str = "train",
    device: torch.device | str = "cpu",
    scaler: torch.amp.GradScaler | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    show: bool = True,
) -> EpochStats:
    """One pass of SGD over `batches`; `scheduler` steps per iteration when given.

    Mixed precision: float16 with `scaler` (CUDA), or bfloat16 autocast with `bf16` (CPUs with native
    bf16 such as AMX). `criterion(logits, x, y)` replaces cross-entropy, e.g. a distillation loss.
    """
    model.train()
    cross_entropy = nn.CrossEntropyLoss()
    loss_of = criterion or (lambda logits, x, y: cross_entropy(logits, y))
    loss_sum, correct, seen = 0.0, 0, 0
    use_amp = scaler is not None or bf16
    amp_dtype = torch.bfloat16 if bf16 else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with step_bar(desc, total, show) as advance:
        for x, y in batches:
            x = x.to(device, non_blocking=True, memory_format=fmt)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
                loss = loss_of(logits.float(), x, y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n = y.numel()
            loss_sum += loss.item() * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
            advance(f"loss {loss_sum / seen:.3f} acc {100 * correct / seen:.1f}%")
    return EpochStats(loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1), seen)


def finetune(
    model: nn.Module,
    batches_for_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    *,
    steps_per_epoch: int,
    options: FinetuneOptions = FinetuneOptions(),
    desc: str = "fine-tune",
    criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Fine-tune `model` in place for `epochs` (`batches_for_epoch(e)` yields that epoch's batches) with a cosine
    learning rate over every step; only parameters that require grad train. One history entry per epoch.

    It trains on `options.device` (a criterion with `to`, such as a distillation teacher, moves too) and hands the
    model back on the CPU."""
    if epochs < 1 or steps_per_epoch < 1:
        raise ModelError(f"fine-tuning needs epochs >= 1 and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}")
    model.to(options.device)
    if hasattr(criterion, "to"):
        criterion.to(options.device)
    try:
        return _epochs(model, batches_for_epoch, epochs, steps_per_epoch, options, desc, criterion)
    finally:
        model.to("cpu")
        if hasattr(criterion, "to"):
            criterion.to("cpu")


def _epochs(model, batches_for_epoch, epochs, steps_per_epoch, options, desc, criterion) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history = []
    for epoch in range(epochs):
        stats = run_epoch(model, batches_for_epoch(epoch), optimizer, scheduler, total=steps_per_epoch,
                          desc=f"{desc} {epoch + 1}/{epochs}", bf16=options.bf16, criterion=criterion,
                          device=options.device)
        history.append({"epoch": epoch + 1, "loss": round(stats.loss, 4), "train_accuracy": round(stats.accuracy, 2)})
    return history
