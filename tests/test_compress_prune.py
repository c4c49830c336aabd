import pytest
import torch
from torch import nn

from edgeres.compress.prune import apply_pruned_spec, prune, pruned_spec
from edgeres.errors import CheckpointError, ModelError
from edgeres.models import create
from edgeres.models.stats import count_macs


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_resnet56_half_prune_cuts_macs_keeps_stage_widths():
    model = create("resnet56").eval()
    x = torch.randn(2, 3, 32, 32)
    report = prune(model, 0.5, example_input=x)
    assert report.macs_before == count_macs(model, 32)
    assert 1 - report.macs_after / report.macs_before >= 0.45
    assert report.params_after < report.params_before
    assert report.model(x).shape == (2, 10)
    convs, orig = _convs(report.model), _convs(model)
    for name, conv in convs.items():
        assert conv.out_channels % 8 == 0 and conv.in_channels % 8 == 0 or name == "conv1"
        if name.endswith("conv1") and name != "conv1":  # block-private channels halve
            assert conv.out_channels == orig[name].out_channels // 2
        if name.endswith("conv2"):  # stage widths, tied by the residual adds, stay
            assert conv.out_channels == orig[name].out_channels


@pytest.mark.parametrize("name", ["wrn-16-2", "resnet18", "resnet20"])
def test_prune_runs_and_round_trips_through_spec(name):
    model = create(name).eval()
    x = torch.randn(2, 3, 32, 32)
    report = prune(model, 0.5, example_input=x)
    assert report.macs_after < report.macs_before * 0.7
    with torch.no_grad():
        out = report.model(x)
    fresh = apply_pruned_spec(create(name), pruned_spec(report.model))
    fresh.load_state_dict(report.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)


def test_round_to_controls_channel_multiples():
    model = create("wrn-16-2").eval()
    report = prune(model, 0.3, example_input=torch.randn(1, 3, 32, 32), round_to=16)
    assert all(c.out_channels % 16 == 0 for c in _convs(report.model).values() if c.out_channels > 3)


def test_bad_inputs_raise_readable_errors():
    model = create("resnet20")
    with pytest.raises(ModelError, match="ratio"):
        prune(model, 1.0, example_input=torch.randn(1, 3, 32, 32))
    with pytest.raises(ModelError, match="importance"):
        prune(model, 0.5, example_input=torch.randn(1, 3, 32, 32), importance="taylor")
    with pytest.raises(CheckpointError, match="not in the model"):
        apply_pruned_spec(create("resnet20"), {"layer9.conv1": {"type": "Conv2d", "in": 8, "out": 8}})
