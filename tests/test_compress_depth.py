import onnx
import pytest
import torch

from edgeres.checkpoint import load_model, read_checkpoint, save_checkpoint
from edgeres.compress import depth
from edgeres.compress.prune import apply_pruned_spec, prune, pruned_spec
from edgeres.errors import CheckpointError, ModelError
from edgeres.models import create
from edgeres.models.stats import count_macs, count_params

FAMILIES = [("resnet20", {}, 9, 2), ("resnet20", {"shortcut": "B"}, 9, 2), ("resnet18", {}, 8, 3),
            ("resnet50", {}, 16, 4), ("wrn-16-2", {}, 6, 3)]


def _model(name, arch, seed=0):
    torch.manual_seed(seed)
    m = create(name, **arch).eval()
    with torch.no_grad():  # BN statistics away from identity, so a wrong bypass shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def _zero_residual(block):
    """Zero the block's residual branch: its last BN (post-activation) or its last conv (pre-activation)."""
    with torch.no_grad():
        if isinstance(block, depth.PRE_ACTIVATION):
            block.conv2.weight.zero_()
        else:
            last = block.bn3 if hasattr(block, "bn3") else block.bn2
            last.weight.zero_()
            last.bias.zero_()


@pytest.mark.parametrize(("name", "arch", "count", "changing"), FAMILIES)
def test_blocks_listed_in_forward_order_with_what_removal_saves(name, arch, count, changing):
    model = _model(name, arch)
    blocks = depth.residual_blocks(model)
    assert len(blocks) == count
    assert [b.name for b in blocks] == sorted((b.name for b in blocks), key=lambda n: tuple(map(int, n[5:].split("."))))
    assert sum(not b.identity for b in blocks) == changing
    assert all(b.leaves == "nothing" and b.leaves_macs == 0 for b in blocks if b.identity)
    first = blocks[0]
    assert (first.stage, first.index, first.input_size) == (1, 0, 32)
    total = count_macs(model)
    for b in (blocks[1], next(b for b in blocks if not b.identity)):  # one of each kind
        cut = depth.remove_blocks(model, [b.name])
        assert total - count_macs(cut) == b.macs_saved > 0
        assert count_params(model) - count_params(cut) == b.params_saved > 0


def test_option_a_shortcut_leaves_no_parameters():
    blocks = {b.name: b for b in depth.residual_blocks(create("resnet20"))}
    assert blocks["layer2.0"].leaves.startswith("zero-pad") and blocks["layer2.0"].leaves_params == 0
    assert blocks["layer2.0"].stride == 2 and (blocks["layer2.0"].in_channels, blocks["layer2.0"].out_channels) == \
        (16, 32)


@pytest.mark.parametrize(("name", "arch", "count", "changing"), FAMILIES)
def test_removed_block_equals_its_residual_branch_zeroed(name, arch, count, changing):
    model = _model(name, arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(depth.remove_blocks(model, [])(x), model(x))  # removing nothing changes nothing
        blocks = depth.residual_blocks(model)
        for b in (blocks[1], next(b for b in blocks if not b.identity)):
            zeroed = _model(name, arch)
            _zero_residual(zeroed.get_submodule(b.name))
            cut = depth.remove_blocks(model, [b.name])
            torch.testing.assert_close(cut(x), zeroed(x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(cut(x), model(x), atol=1e-3)  # the block did something


def test_remove_blocks_is_a_copy_and_onnx_has_no_trace(tmp_path):
    from edgeres.export import export_onnx

    model = create("resnet20").eval()
    cut = depth.remove_blocks(model, ["layer1.1", "layer3.2"])
    assert depth.removed_blocks(model) == [] and depth.removed_blocks(cut) == ["layer1.1", "layer3.2"]
    assert len(depth.residual_blocks(cut)) == 7 and cut.cfg == model.cfg
    path = export_onnx(cut, tmp_path / "cut.onnx", input_size=32)
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert not [n for n in names if "layer1.1/" in n or "layer3.2/" in n]
    assert [n for n in names if "layer1.2/" in n]
    assert sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node) == 19 - 4


def test_bad_removals_raise_readable_errors():
    model = create("resnet20")
    with pytest.raises(ModelError, match="no residual block 'layer4.0'"):
        depth.remove_blocks(model, ["layer4.0"])
    with pytest.raises(ModelError, match="already removed"):
        depth.remove_blocks(depth.remove_blocks(model, ["layer1.0"]), ["layer1.0"])
    with pytest.raises(ModelError, match="named twice"):
        depth.remove_blocks(model, ["layer1.0", "layer1.0"])
    with pytest.raises(ModelError, match="no network"):
        depth.remove_blocks(model, [b.name for b in depth.residual_blocks(model)])
    with pytest.raises(ModelError, match="no residual blocks"):
        depth.residual_blocks(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), input_size=8)


@pytest.mark.parametrize("order", ["depth-then-channels", "channels-then-depth"])
def test_checkpoint_round_trip_with_channel_pruning(tmp_path, order):
    model = _model("resnet20", {})
    x = torch.randn(2, 3, 32, 32)
    if order == "depth-then-channels":
        pruned = prune(depth.remove_blocks(model, ["layer1.2", "layer2.0"]), 0.5, example_input=x).model
    else:
        pruned = depth.remove_blocks(prune(model, 0.5, example_input=x).model, ["layer1.2", "layer2.0"])
    pruned.cfg = model.cfg
    assert pruned.layer1[1].conv1.out_channels == 8 and depth.removed_blocks(pruned) == ["layer1.2", "layer2.0"]
    save_checkpoint(tmp_path / "p.pt", pruned, pruned=pruned_spec(pruned))
    assert read_checkpoint(tmp_path / "p.pt").pruned["removed_blocks"] == ["layer1.2", "layer2.0"]
    again = load_model(None, tmp_path / "p.pt").eval()
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    assert depth.removed_blocks(again) == ["layer1.2", "layer2.0"]


def test_spec_written_before_depth_pruning_still_applies():
    model = prune(create("resnet20").eval(), 0.5, example_input=torch.randn(1, 3, 32, 32)).model
    old = pruned_spec(model)["layers"]  # the flat layer map older checkpoints hold
    fresh = apply_pruned_spec(create("resnet20"), old)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(CheckpointError, match="removed blocks do not fit"):
        apply_pruned_spec(create("resnet20"), {"format": "edgeres-pruned/2", "removed_blocks": ["layer3.5"],
                                               "layers": {}})
    with pytest.raises(CheckpointError, match="newer"):
        apply_pruned_spec(create("resnet20"), {"format": "edgeres-pruned/9"})


def test_importance_finds_a_block_that_does_nothing():
    model = _model("resnet20", {})
    _zero_residual(model.layer2[2])
    images = torch.randn(48, 3, 32, 32)
    with torch.no_grad():  # logits of a trained model's scale: neither uniform nor saturated
        model.fc.weight.mul_(3 / model(images).std())
    costs = depth.block_importance(model, images)
    assert set(costs) == {b.name for b in depth.residual_blocks(model)}
    assert costs["layer2.2"] < 1e-9 and min(v for k, v in costs.items() if k != "layer2.2") > 1e-5
    # the same scores whichever way the images come (batches, (x, y) pairs)
    again = depth.block_importance(model, [(images[:20], None), (images[20:], None)])
    assert again == pytest.approx(costs, rel=1e-4, abs=1e-9)
    picked = depth.choose_blocks(model, images, 3)
    assert picked[0].name == "layer2.2" and picked[0].after == ()
    assert picked[2].after == (picked[0].name, picked[1].name) and len({p.name for p in picked}) == 3
    # each greedy step's cost is what removing that block costs given the earlier removals
    with torch.no_grad():
        ref = torch.log_softmax(model(images), 1)
        got = torch.log_softmax(depth.remove_blocks(model, [picked[0].name, picked[1].name])(images), 1)
    kl = float((ref.exp() * (ref - got)).sum(1).mean())
    assert kl == pytest.approx(picked[1].cost, rel=1e-4)
    one_shot = depth.choose_blocks(model, images, 2, greedy=False)
    assert [c.name for c in one_shot] == sorted(costs, key=costs.get)[:2]
    with pytest.raises(ModelError, match="cannot remove 10"):
        depth.choose_blocks(model, images, 10)
