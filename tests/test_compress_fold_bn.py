import pytest
import torch
from torch import nn

from edgeres.compress.fold_bn import fold_bn
from edgeres.models import create


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "kwargs", "folded", "unfoldable"),
    [
        ("resnet20", {}, 19, 0),  # stem + 2 per block
        ("resnet20", {"shortcut": "B"}, 21, 0),  # + two option-B downsample BNs
        ("resnet18", {}, 20, 0),  # stem + 2 per block + 3 downsample
        ("wrn-16-1", {}, 6, 7),  # block bn2 folds; block bn1 and the final bn follow an add
        ("wrn-16-2", {}, 7, 6),  # first block's bn1 reads only the stem conv (projection shortcut) and folds
    ],
)
def test_fold_matches_eager_logits(name, kwargs, folded, unfoldable):
    model = _randomise_bn(create(name, **kwargs))
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    report = fold_bn(model)
    assert (report.folded, report.unfoldable) == (folded, unfoldable)
    with torch.no_grad():
        ref, out = model(x), report.model(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in report.model.modules())
    assert bns == unfoldable
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "input model must stay untouched"


@pytest.mark.parametrize("name", ["wrn-16-1", "wrn-16-2"])
def test_depthwise_turns_unfoldable_bns_into_equal_convs(name):
    model = _randomise_bn(create(name))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = fold_bn(model, depthwise=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in report.model.modules())
    dw = [m for m in report.model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == report.unfoldable > 0
    assert all(m.kernel_size == (1, 1) and m.groups == m.in_channels == m.out_channels for m in dw)
    with torch.no_grad():
        ref, out = model(x), report.model(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_fold_keeps_cfg_and_eval_mode():
    model = create("resnet20").train()
    report = fold_bn(model)
    assert report.model.cfg == model.cfg
    assert not report.model.training
    assert model.training
