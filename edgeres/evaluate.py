"""Top-1 accuracy and error of a model over a data split: a PyTorch model (`evaluate`) or a compiled artifact
through its runtime (`evaluate_session`). One result record, `EvalResult`, for both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgeres.finetune import step_bar


@dataclass(frozen=True)
class EvalResult:
    """Top-1 on a data split; accuracy and error in percent."""

    correct: int
    total: int
    top1_accuracy: float
    top1_error: float
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    total: int | None = None,
    desc: str = "eval",
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    amp: bool = False,
    show: bool = True,
) -> EvalResult:
    """Top-1 accuracy/error (percent) of `model` over `batches`."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with step_bar(desc, total, show) as advance:
        for x, y in batches:
            x, y = x.to(device, memory_format=fmt), y.to(device)
            with torch.autocast(device_type=torch.device(device).type, enabled=amp):
                logits = model(x)
            loss_sum += float(criterion(logits.float(), y))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            advance(f"acc {100 * correct / seen:.2f}%")
    return result_from_counts(correct, seen, loss_sum)


def result_from_counts(correct: int, total: int, loss_sum: float = float("nan")) -> EvalResult:
    acc = 100.0 * correct / max(total, 1)
    loss = loss_sum / max(total, 1)
    return EvalResult(int(correct), int(total), round(acc, 4), round(100.0 - acc, 4), loss)


def evaluate_session(backend, session, ds, *, mean, std, batch_size: int = 256, desc: str = "eval") -> EvalResult:
    """Top-1 of a compiled artifact, run through its runtime, over a whole data set."""
    from edgeres.data import batches, num_batches
    from edgeres.progress import progress

    correct = seen = 0
    with progress() as bar:
        task = bar.add_task(desc, total=num_batches(ds, batch_size), status="")
        for x, y in batches(ds, batch_size, mean=mean, std=std):
            logits = backend.run(session, x.numpy())
            correct += int((logits.argmax(1) == y.numpy()).sum())
            seen += len(y)
            bar.update(task, advance=1, status=f"acc {100 * correct / seen:.2f}%")
    return result_from_counts(correct, seen)
