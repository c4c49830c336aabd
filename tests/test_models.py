import pytest
import torch

from edgeres import models
from edgeres.errors import ModelError
from edgeres.models.stats import count_macs, count_params


def n_params(name, **kw):
    return count_params(models.create(name, **kw))


@pytest.mark.parametrize(
    "name,expected",
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018),
     ("resnet110", 1_727_962)],
)
def test_cifar_resnet_params_match_paper(name, expected):
    # Paper (He et al. 2015, table 6): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M; exact counts from the reference code.
    assert n_params(name) == expected


def test_imagenet_resnet_params_equal_torchvision():
    assert n_params("resnet18", num_classes=1000, input_size=224) == 11_689_512
    assert n_params("resnet50", num_classes=1000, input_size=224) == 25_557_032


@pytest.mark.parametrize("name,millions", [("wrn-28-10", 36.5), ("wrn-16-4", 2.7), ("wrn-40-4", 8.9)])
def test_wrn_params_match_paper(name, millions):
    assert round(n_params(name) / 1e6, 1) == millions


def test_width_option_overrides_k():
    m = models.create("wrn-16-4", width=2)
    assert m.cfg.name == "wrn-16-2"
    assert count_params(m) == count_params(models.create("wrn-16-2"))


def test_option_b_shortcut_adds_projections_only_where_shape_changes():
    a, b = models.create("resnet20"), models.create("resnet20", shortcut="B")
    projections = [k for k in b.state_dict() if "downsample" in k and k.endswith("0.weight")]
    assert projections == ["layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight"]
    assert count_params(b) > count_params(a)
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn-10-1"])
def test_forward_shapes_and_num_classes(name):
    m = models.create(name, num_classes=7).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m.cfg.num_classes == 7


def test_resnet_stem_follows_input_size():
    small = models.create("resnet18")
    big = models.create("resnet18", input_size=224)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)


def test_torchvision_key_names():
    keys = list(models.create("resnet50", num_classes=1000, input_size=224).state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer1.0.downsample.0.weight" in keys and "layer4.2.conv3.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


def test_torchvision_state_dict_gives_identical_outputs():
    tv = pytest.importorskip("torchvision.models", reason="torchvision not installed (no CPU build here)")
    ref = tv.resnet18(num_classes=1000).eval()
    ours = models.create("resnet18", num_classes=1000, input_size=224).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(ours(x), ref(x))


def test_macs_resnet18_imagenet():
    # torchvision's documented 1.81 GFLOPS (MACs) for resnet18 at 224x224
    assert round(count_macs(models.create("resnet18", num_classes=1000, input_size=224)) / 1e9, 2) == 1.82


@pytest.mark.parametrize(
    "name,kw,message",
    [
        ("resnet21", {}, "unknown model"),
        ("wrn-17-2", {}, r"6n\+4"),
        ("wrn-16-0", {}, "width k"),
        ("resnet20", {"shortcut": "C"}, "shortcut"),
        ("resnet20", {"width": 2}, "does not take"),
    ],
)
def test_bad_architectures_are_clear_errors(name, kw, message):
    with pytest.raises(ModelError, match=message):
        models.create(name, **kw)


def test_cifar_depth_must_be_6n_plus_2():
    from edgeres.models.resnet_cifar import CifarResNet

    with pytest.raises(ModelError, match="6n\\+2"):
        CifarResNet(21)


def test_list_models_pattern():
    assert models.list_models("resnet2*") == ["resnet20"]
    assert "wrn-D-K" in models.list_models()
