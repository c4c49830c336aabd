import pytest
import torch
from torch import nn

from edgeres.compress.quantize import (
    QatOptions,
    QuantizeOptions,
    load_quantized,
    ptq,
    qat,
    quantizer_summary,
    save_quantized,
    strip,
)
from edgeres.errors import CheckpointError, ModelError
from edgeres.models import create

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _calib(n_batches=3, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 32, 32, generator=g) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def fp32():
    torch.manual_seed(0)
    return create("resnet20").eval()


@pytest.fixture(scope="module")
def qmodel(fp32):
    return ptq(fp32, _calib(), example_input=X)


def test_ptq_is_symmetric_int8_with_signed_activations(qmodel):
    rows = quantizer_summary(qmodel)
    weights = [r for r in rows if r["per_channel"]]
    acts = [r for r in rows if not r["per_channel"]]
    assert len(weights) == 20  # 19 convs + fc
    assert all((r["level_low"], r["level_high"]) == (-127, 127) for r in weights)
    assert acts and all(r["signed"] and (r["level_low"], r["level_high"]) == (-128, 127) for r in acts)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()), "BN must be folded first"
    assert qmodel.cfg.name == "resnet20"


def test_unsigned_option_keeps_nncf_uint8_after_relu(fp32):
    opts = QuantizeOptions(signed_activations=False, bias_correction=False)
    q = ptq(fp32, _calib(1), example_input=X, options=opts)
    unsigned = [r for r in quantizer_summary(q) if not r["signed"]]
    assert unsigned and all((r["level_low"], r["level_high"]) == (0, 255) for r in unsigned)


def test_int8_stays_close_to_fp32(fp32, qmodel):
    x = torch.cat(_calib(2, seed=5))
    with torch.no_grad():
        ref, out = fp32(x), qmodel(x)
    cos = nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cos > 0.98


def test_save_load_round_trip_is_exact(tmp_path, fp32, qmodel):
    path = save_quantized(tmp_path / "q.pt", qmodel)
    restored = load_quantized(path, create("resnet20"), X)
    x = torch.cat(_calib(1, seed=7))
    with torch.no_grad():
        assert torch.equal(restored(x), qmodel(x))
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="save_quantized"):
        load_quantized(tmp_path / "plain.pt", create("resnet20"), X)


def test_saved_config_names_no_class(tmp_path, qmodel):
    """NNCF's enum is stored as a plain value: on Python 3.11.2 an enum pickles through `getattr`, which
    weights-only loading refuses, so a class reference in the pickle would make the file unloadable there."""
    import pickletools
    import zipfile

    path = save_quantized(tmp_path / "q.pt", qmodel)
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    classes = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    assert classes and all(c.split()[0] in ("torch", "torch._utils", "collections") for c in classes), classes


def test_strip_gives_the_same_logits(qmodel):
    stripped = strip(qmodel, X)
    assert "Quantizer" not in "".join(type(m).__name__ for m in stripped.modules())
    x = torch.cat(_calib(2, seed=9))
    with torch.no_grad():
        ref, out = qmodel(x), stripped(x)
    # torch's fake-quant and NNCF's kernel may round a tie differently; the effect stays small.
    assert nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_qat_trains_weights_and_scales(fp32):
    q = ptq(fp32, _calib(1), example_input=X, options=QuantizeOptions(bias_correction=False))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    seen = []
    qat(q, lambda epoch: batches, epochs=1, steps_per_epoch=2, options=QatOptions(lr=0.05),
        on_epoch=lambda e, loss, top1: seen.append((e, loss)))
    after = q.state_dict()
    assert seen and seen[0][0] == 0 and seen[0][1] > 0
    assert not torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    scales = [k for k in after if k.endswith(".scale") and "post_hooks" in k]
    assert any(not torch.equal(after[k], before[k]) for k in scales)
    assert not q.training


def test_bad_inputs(fp32):
    with pytest.raises(ModelError, match="calibration"):
        ptq(fp32, [], example_input=X)
    with pytest.raises(ModelError, match="epochs"):
        qat(fp32, lambda e: [], epochs=0, steps_per_epoch=1)
