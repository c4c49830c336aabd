"""INT8 with NNCF: post-training calibration (PTQ), quantization-aware fine-tuning (QAT), save, strip.

The flow: fold BN (eager), `nncf.quantize` (symmetric int8: per-channel weights in [-127, 127],
per-tensor activations), then make every activation quantizer signed so the one model serves both
runtimes (TensorRT has no uint8; `backends.ort.to_cpu_flavour` turns post-ReLU int8 back into uint8
losslessly for ONNX Runtime). QAT is an ordinary training loop over the quantized model; `strip`
yields plain torch fake-quant ops that export to ONNX QuantizeLinear/DequantizeLinear.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeres.compress.fold_bn import fold_bn
from edgeres.errors import CheckpointError, ModelError
from edgeres.finetune import FinetuneOptions, finetune
from edgeres.io import atomic_write
from edgeres.progress import quiet_libraries


@dataclass(frozen=True)
class QuantizeOptions:
    """Knobs of post-training quantization."""

    calib_batches: int | None = None  # how many calibration batches to use; None: all given
    signed_activations: bool = True  # int8 everywhere (TensorRT-legal); False keeps NNCF's uint8 after ReLU
    bias_correction: bool = True  # NNCF's (fast) bias correction after calibration
    bn_as_conv: bool = True  # BNs with no conv to fold into (pre-activation WRN) as depthwise convs: quantized too


@dataclass(frozen=True)
class QatOptions:
    """Knobs of quantization-aware fine-tuning: SGD with momentum and a cosine schedule."""

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4


def _quantizers(model: nn.Module):
    from nncf.torch.quantization.layers import BaseQuantizer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseQuantizer)]


def make_activations_signed(qmodel: nn.Module) -> int:
    """Switch every unsigned quantizer to signed int8 (levels re-derived, scale kept); return how many."""
    changed = 0
    for _, q in _quantizers(qmodel):
        if not q.signed:
            q.signed = True  # the setter re-derives level_low/level_high: [0, 255] -> [-128, 127]
            changed += 1
    return changed


def quantizer_summary(qmodel: nn.Module) -> list[dict]:
    """One row per quantizer: name, signed, levels, per-channel or not (for reports and tests)."""
    return [
        {
            "name": n,
            "signed": bool(q.signed),
            "level_low": int(q.level_low),
            "level_high": int(q.level_high),
            "per_channel": math.prod(q.scale_shape) > 1,
        }
        for n, q in _quantizers(qmodel)
    ]


def ptq(
    model: nn.Module,
    calib_batches: list[torch.Tensor],
    *,
    example_input: torch.Tensor,
    options: QuantizeOptions | None = None,
) -> nn.Module:
    """Fold BN, calibrate int8 with NNCF on `calib_batches` (normalised NCHW tensors); return the model."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    options = options or QuantizeOptions()
    batches = list(calib_batches)[: options.calib_batches] if options.calib_batches else list(calib_batches)
    if not batches:
        raise ModelError("int8 calibration needs data; pass calibration batches (e.g. --calib-size 512)")
    folded = fold_bn(model, example_input=example_input, depthwise=options.bn_as_conv).model
    with quiet_libraries():  # NNCF's INFO lines and tracer warnings; its progress bars stay
        qmodel = nncf.quantize(
            folded,
            nncf.Dataset(batches),
            subset_size=len(batches),
            advanced_parameters=AdvancedQuantizationParameters(
                disable_bias_correction=not options.bias_correction,
                # NNCF would give a depthwise conv's input per-channel scales; ORT's QLinearAdd feeding it needs one
                activations_quantization_params=QuantizationParameters(per_channel=False),
            ),
        )
    qmodel.bn_as_conv = options.bn_as_conv  # load_quantized rebuilds the same modules
    if options.signed_activations:
        make_activations_signed(qmodel)
    if hasattr(model, "cfg"):
        qmodel.cfg = model.cfg
    return qmodel.eval()


def qat(
    qmodel: nn.Module,
    train_batches_fn: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    *,
    steps_per_epoch: int,
    options: QatOptions | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> nn.Module:
    """Fine-tune a quantized model in place: `train_batches_fn(epoch)` yields (images, labels) batches.

    SGD (momentum, weight decay) with a cosine learning rate over `epochs * steps_per_epoch` steps;
    quantizer scales train along with the weights. `on_epoch(epoch, loss, top1)` reports progress.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ModelError(f"QAT needs epochs >= 1 and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}")
    options = options or QatOptions()
    with quiet_libraries():
        history = finetune(qmodel, train_batches_fn, epochs, steps_per_epoch=steps_per_epoch, desc="QAT",
                           options=FinetuneOptions(lr=options.lr, momentum=options.momentum,
                                                   weight_decay=options.weight_decay))
    if on_epoch is not None:
        for entry in history:
            on_epoch(entry["epoch"] - 1, entry["loss"], entry["train_accuracy"])
    return qmodel.eval()


_ENUM_TAG = "__edgeres_enum__"


def _plain_enums(obj):
    """NNCF's config with every enum member as `{tag: class name, "value": value}`: how Python pickles an enum
    differs between 3.11 releases (3.11.2 goes through `getattr`, which weights-only loading refuses)."""
    import enum

    if isinstance(obj, enum.Enum):
        return {_ENUM_TAG: type(obj).__name__, "value": obj.value}
    if isinstance(obj, dict):
        return {k: _plain_enums(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain_enums(v) for v in obj)
    return obj


def _enums_back(obj, known: dict):
    """`_plain_enums` undone for the enum classes in `known` (name -> class); any other tag is an error."""
    if isinstance(obj, dict) and _ENUM_TAG in obj:
        cls = known.get(obj[_ENUM_TAG])
        if cls is None:
            raise CheckpointError(f"quantized checkpoint names an unknown enum {obj[_ENUM_TAG]!r}; "
                                  "re-run the int8 export")
        return cls(obj["value"])
    if isinstance(obj, dict):
        return {k: _enums_back(v, known) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_enums_back(v, known) for v in obj)
    return obj


def save_quantized(path: str | Path, qmodel: nn.Module) -> Path:
    """Write NNCF's transformation config and the state_dict (loadable with weights_only=True)."""
    from nncf.torch import get_config

    path = Path(path)
    payload = {"format": "edgeres-nncf-int8/1", "nncf_config": _plain_enums(get_config(qmodel)),
               "state_dict": qmodel.state_dict(),
               "bn_as_conv": bool(getattr(qmodel, "bn_as_conv", False))}
    if hasattr(qmodel, "cfg"):
        payload["model_cfg"] = qmodel.cfg.to_dict()
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_quantized(path: str | Path, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """Rebuild a quantized model saved by `save_quantized` on a fresh FP32 `model` of the same architecture.

    BN is folded first (as `ptq` did), then NNCF's config re-inserts the quantizers.
    """
    from nncf.common.quantization.structs import QuantizationScheme
    from nncf.torch import load_from_config

    try:
        # Checkpoints written before enums were stored as plain values pickle NNCF's one enum by class; allow
        # exactly that class in the weights-only unpickler.
        with torch.serialization.safe_globals([QuantizationScheme]):
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read quantized checkpoint {path}: {exc}; re-run the int8 export") from exc
    if not isinstance(payload, dict) or payload.get("format") != "edgeres-nncf-int8/1":
        raise CheckpointError(f"{path} is not an edgeres int8 checkpoint; save it with save_quantized")
    folded = fold_bn(model, example_input=example_input, depthwise=payload.get("bn_as_conv", False)).model
    with quiet_libraries():
        config = _enums_back(payload["nncf_config"], {"QuantizationScheme": QuantizationScheme})
        qmodel = load_from_config(folded, config)
    try:
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit this model ({str(exc).splitlines()[0]}); build the same architecture"
        ) from exc
    qmodel.bn_as_conv = payload.get("bn_as_conv", False)
    if hasattr(model, "cfg"):
        qmodel.cfg = model.cfg
    return qmodel.eval()


def strip(qmodel: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A copy with NNCF quantizers replaced by torch fake-quant ops (exports to ONNX Q/DQ)."""
    import nncf

    with quiet_libraries():  # torchao, imported here, notes its missing GPU kernels
        stripped = nncf.strip(qmodel, do_copy=True, example_input=example_input)
    if hasattr(qmodel, "cfg"):
        stripped.cfg = qmodel.cfg
    return stripped.eval()
