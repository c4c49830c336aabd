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


def test_width_per_group_gives_torchvision_wide_resnets():
    # torchvision's records: wide_resnet50_2 68,883,240 params, ResNet-34 21,797,672
    wide = models.create("wide_resnet50_2")
    assert count_params(wide) == 68_883_240
    assert wide.cfg.input_size == 224 and wide.cfg.num_classes == 1000
    assert isinstance(wide.maxpool, torch.nn.MaxPool2d) and wide.conv1.kernel_size == (7, 7)
    # 128 per group doubles only the inner 3x3 width; the block output stays planes * 4
    block = wide.layer1[0]
    assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (128, 128, 256)
    assert n_params("resnet34", num_classes=1000, input_size=224) == 21_797_672
    with pytest.raises(ModelError, match="BasicBlock .* width_per_group 64 only, got 128"):
        models.create("resnet18", width_per_group=128)


def _conv_bn_params(cin, cout, k):
    return cin * cout * k * k + 2 * cout


def test_quarter_width_resnet34_is_resnet34_with_channels_over_4_and_a_3x3_stem():
    m = models.create("resnet34_quarter").eval()
    assert m.cfg.name == "resnet34_quarter" and m.cfg.input_size == 32 and m.cfg.dataset == "cifar10"
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.out_channels) == ((3, 3), (1, 1), 16)
    assert isinstance(m.maxpool, torch.nn.MaxPool2d)  # kept, as in ResNet-34
    stages = [m.layer1, m.layer2, m.layer3, m.layer4]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    assert [s[-1].conv2.out_channels for s in stages] == [16, 32, 64, 128]
    assert m.fc.in_features == 128
    # Its parameters counted from the design alone: stem, 16 BasicBlocks, 3 projections, fc.
    expected = _conv_bn_params(3, 16, 3)
    cin = 16
    for width, blocks in zip((16, 32, 64, 128), (3, 4, 6, 3), strict=True):
        for i in range(blocks):
            expected += _conv_bn_params(cin, width, 3) + _conv_bn_params(width, width, 3)
            if i == 0 and cin != width:
                expected += _conv_bn_params(cin, width, 1)
            cin = width
    expected += 128 * 10 + 10
    assert count_params(m) == expected
    # layer4 sees 2x2 on CIFAR: 32 -> max-pool 16 -> 8 -> 4 -> 2
    seen = {}
    m.layer4.register_forward_hook(lambda mod, inp, out: seen.update(layer4=tuple(out.shape)))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen["layer4"] == (2, 128, 2, 2)


def test_width_mult_scales_every_channel_and_round_trips_through_a_checkpoint(tmp_path):
    from edgeres.checkpoint import load_model, save_checkpoint

    half = models.create("resnet18", width_mult=0.5)
    assert [s[-1].conv2.out_channels for s in (half.layer1, half.layer2, half.layer3, half.layer4)] == [32, 64, 128,
                                                                                                       256]
    assert half.cfg.arch == {"width_mult": 0.5}
    path = save_checkpoint(tmp_path / "half.pt", half)
    again = load_model(None, path)
    assert count_params(again) == count_params(half)
    with pytest.raises(ModelError, match="whole channel counts"):
        models.create("resnet18", width_mult=0.3)


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
