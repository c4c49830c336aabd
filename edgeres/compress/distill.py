"""Knowledge distillation (Hinton et al. 2015): a pruned model learns from its unpruned original.

Short fine-tuning after structured pruning recovers more accuracy when the student matches the
teacher's softened logits as well as the labels: loss = alpha * T^2 * KL(teacher_T || student_T)
+ (1 - alpha) * cross-entropy. The teacher runs in eval mode without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeres.errors import EdgeresError

TEMPERATURE = 4.0
ALPHA = 0.9


class Distillation:
    """A training criterion `(student_logits, x, y) -> loss` that asks `teacher` for its logits on `x`."""

    def __init__(self, teacher: nn.Module, *, temperature: float = TEMPERATURE, alpha: float = ALPHA) -> None:
        if temperature <= 0:
            raise EdgeresError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise EdgeresError(f"distillation alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x).float()
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1),
                        reduction="batchmean", log_target=True)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * F.cross_entropy(logits, y)

    def to(self, device: torch.device | str) -> Distillation:
        """Move the teacher with the student (a fine-tune on a GPU)."""
        self.teacher.to(device)
        return self

    def to_dict(self) -> dict:
        return {"method": "logit distillation from the unpruned model", "temperature": self.temperature,
                "alpha": self.alpha}
