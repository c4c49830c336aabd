"""Knowledge distillation criterion, and bf16 fine-tuning steps."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeres.compress.distill import Distillation
from edgeres.errors import EdgeresError
from edgeres.finetune import run_epoch
from edgeres.models import create

X = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3, 4, 5])


class _Fixed(nn.Module):
    """A 'teacher' that answers fixed logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits + 0 * self.w


def test_alpha_zero_is_plain_cross_entropy():
    logits = torch.randn(6, 10)
    loss = Distillation(_Fixed(torch.randn(6, 10)), alpha=0.0)(logits, X, Y)
    assert torch.allclose(loss, F.cross_entropy(logits, Y))


def test_matching_the_teacher_leaves_only_the_label_term():
    logits = torch.randn(6, 10)
    kd = Distillation(_Fixed(logits.clone()), temperature=4.0, alpha=0.9)
    assert torch.allclose(kd(logits, X, Y), 0.1 * F.cross_entropy(logits, Y), atol=1e-6)
    other = Distillation(_Fixed(torch.randn(6, 10)), temperature=4.0, alpha=0.9)
    assert other(logits, X, Y) > kd(logits, X, Y)


def test_gradient_pulls_the_student_toward_the_teacher():
    target = torch.randn(6, 10)
    student = torch.zeros(6, 10, requires_grad=True)
    Distillation(_Fixed(target), alpha=1.0)(student, X, Y).backward()
    # descending the gradient raises the teacher's favourite class in every row
    assert torch.all(student.grad.argmin(1) == target.argmax(1))


def test_teacher_is_frozen_and_in_eval_mode():
    teacher = create("resnet20").train()
    Distillation(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"alpha": 1.5}])
def test_bad_settings_are_one_line_errors(kw):
    with pytest.raises(EdgeresError):
        Distillation(_Fixed(torch.zeros(1, 10)), **kw)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("bf16", [False, True])
def test_distilled_epoch_lowers_the_loss(bf16):
    torch.manual_seed(0)
    teacher, student = _tiny().eval(), _tiny()
    kd = Distillation(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    batches = [(X, Y)] * 8
    first = run_epoch(student, batches[:1], opt, show=False, bf16=bf16, criterion=kd).loss
    last = run_epoch(student, batches, opt, show=False, bf16=bf16, criterion=kd).loss
    assert last < first and torch.isfinite(torch.tensor(last))
    assert all(p.dtype == torch.float32 for p in student.parameters())  # autocast keeps fp32 master weights
