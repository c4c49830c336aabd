import collections

import pytest
import torch

from edgeres import checkpoint, models
from edgeres.errors import CheckpointError


def test_research_layout_loads_and_matches_known_accuracy_subset(resnet20_weights, cifar_test):
    from edgeres import data
    from edgeres.evaluate import evaluate

    m = checkpoint.load_model("resnet20", resnet20_weights)
    sub = data.subset(cifar_test, 1000, seed=0)
    r = evaluate(m, data.batches(sub, 500, mean=m.cfg.mean, std=m.cfg.std))
    assert r.top1_accuracy > 88.0  # the full-split figure (91.73) is checked in test_cli / slow tests


def test_bare_state_dict_and_edgeres_checkpoint_round_trip(tmp_path):
    m = models.create("wrn-10-2").eval()
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    checkpoint.save_checkpoint(tmp_path / "ed.pt", m)
    x = torch.randn(2, 3, 32, 32)
    a = checkpoint.load_model("wrn-10-2", tmp_path / "bare.pt").eval()
    b = checkpoint.load_model(None, tmp_path / "ed.pt").eval()  # the checkpoint names its model
    assert b.cfg.name == "wrn-10-2"
    assert torch.equal(a(x), m(x)) and torch.equal(b(x), m(x))


def test_research_layout_with_module_prefix_and_linear_head(tmp_path):
    m = models.create("resnet20").eval()
    sd = collections.OrderedDict(
        ("module." + k.replace("fc.", "linear."), v) for k, v in m.state_dict().items()
        if not k.endswith("num_batches_tracked")
    )
    torch.save({"state_dict": sd, "best_prec1": 91.0}, tmp_path / "r.th")
    ck = checkpoint.read_checkpoint(tmp_path / "r.th")
    assert ck.layout == "research" and "fc.weight" in ck.state_dict
    loaded = checkpoint.load_model("resnet20", tmp_path / "r.th").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), m(x))


def test_transfer_learning_replaces_only_the_classifier(tmp_path):
    m = models.create("resnet20")
    checkpoint.save_checkpoint(tmp_path / "c10.pt", m)
    t = checkpoint.load_model("resnet20", tmp_path / "c10.pt", num_classes=100)
    assert t.fc.out_features == 100
    assert torch.equal(t.conv1.weight, m.conv1.weight)
    assert torch.equal(t.layer3[2].conv2.weight, m.layer3[2].conv2.weight)


def test_hostile_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        checkpoint.read_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_checkpoint_is_refused(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.read_checkpoint(tmp_path / "bad.pt")


def test_truncated_checkpoint_is_refused(tmp_path):
    torch.save(models.create("resnet20").state_dict(), tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.read_checkpoint(tmp_path / "cut.pt")


def test_wrong_model_for_checkpoint(tmp_path):
    torch.save(models.create("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(CheckpointError, match="does not fit resnet32"):
        checkpoint.load_model("resnet32", tmp_path / "r20.pt")
    torch.save(models.create("wrn-10-2").state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="--width"):
        checkpoint.load_model("wrn-10-4", tmp_path / "w.pt")


def test_weights_tag_is_verified(resnet20_weights):
    assert checkpoint.resolve_weights("resnet20.cifar10_akamaster") == resnet20_weights
    with pytest.raises(CheckpointError, match="unknown weights tag"):
        checkpoint.resolve_weights("resnet20.imagenet")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.read_checkpoint(tmp_path / "none.pt")


def test_unset_options_keep_the_checkpoints_own(tmp_path):
    """`edgeres export resnet18 --weights x.pt` passes input_size=None: the saved 64 px stem must win."""
    from edgeres import models
    from edgeres.checkpoint import load_model, save_checkpoint

    path = save_checkpoint(tmp_path / "r18.pt", models.create("resnet18", num_classes=5, input_size=64))
    model = load_model("resnet18", path, input_size=None, width=None)
    assert model.cfg.input_size == 64 and model.conv1.weight.shape[-1] == 7


def test_non_finite_tensor_is_named(tmp_path):
    sd = models.create("resnet20").state_dict()
    sd["layer2.1.bn2.running_mean"][0] = float("inf")
    torch.save(sd, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match="layer2.1.bn2.running_mean holds 1 non-finite"):
        checkpoint.load_model("resnet20", tmp_path / "inf.pt")


def test_weights_are_required_unless_random_init_is_asked():
    with pytest.raises(CheckpointError, match="has no weights"):
        checkpoint.require_weights("resnet20", None, random_init=False)
    assert checkpoint.require_weights("resnet20", None, random_init=True) is True
    assert checkpoint.require_weights("resnet20.cifar10_akamaster", None, random_init=False) is False
    with pytest.raises(CheckpointError, match="contradicts"):
        checkpoint.require_weights("resnet20", "w.pt", random_init=True)
