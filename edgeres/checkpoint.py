"""Weights in and out: edgeres checkpoints, bare torchvision-style state_dicts, research layouts.

Every load goes through `torch.load(..., weights_only=True)`: a file that needs arbitrary
unpickling is refused, never executed.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from edgeres import models
from edgeres import weights as published
from edgeres.errors import CheckpointError
from edgeres.io import atomic_write
from edgeres.preprocess import Preprocess

log = logging.getLogger("edgeres")
FORMAT = "edgeres-checkpoint/1"


@dataclass
class Checkpoint:
    """A state_dict in edgeres key names, plus what the file said about the model."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # "edgeres" | "research" | "state_dict"
    model: str | None = None
    cfg: dict | None = None
    pruned: dict | None = None
    extra: dict | None = None


def _safe_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a weights-only checkpoint (it asks to unpickle code); "
            "re-save it as a plain state_dict with torch.save(model.state_dict(), ...)"
        ) from exc
    except Exception as exc:  # torch.load raises many types on garbage bytes; all mean "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". ")[0][:120]  # the reason, not the advice torch appends
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({first})") from exc


def _normalise_keys(sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state_dict entry {key!r} is not a tensor; not a model checkpoint")
        if key.startswith("module."):  # DataParallel / DDP prefix
            key = key[len("module.") :]
        if key.startswith("linear."):  # research CIFAR layout names the head `linear`
            key = "fc." + key[len("linear.") :]
        out[key] = value
    return out


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first tensor (weight, bias or BN statistic) that holds NaN or infinity."""
    for key, value in state_dict.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"{source}: tensor {key} holds {bad} non-finite value(s) (NaN or inf) of {value.numel()}; "
                    "the checkpoint is broken: use an earlier one or retrain"
                )


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported layout; raises CheckpointError with one readable line otherwise (non-finite too)."""
    path = Path(path)
    obj = _safe_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if obj.get("format") == FORMAT and isinstance(obj.get("state_dict"), dict):
        ckpt = Checkpoint(
            _normalise_keys(obj["state_dict"]), "edgeres", obj.get("model"), obj.get("cfg"), obj.get("pruned"),
            obj.get("extra"),
        )
    elif isinstance(obj.get("state_dict"), dict):
        ckpt = Checkpoint(_normalise_keys(obj["state_dict"]), "research")
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = Checkpoint(_normalise_keys(obj), "state_dict")
    else:
        raise CheckpointError(f"{path} has no state_dict (keys: {', '.join(map(str, list(obj)[:5]))})")
    check_finite(ckpt.state_dict, str(path))
    return ckpt


def require_weights(name: str | None, weights: str | os.PathLike | None, random_init: bool) -> bool:
    """Whether the model runs on random weights: only when asked (`random_init`), never by omission.

    No --weights and no weights tag is an error naming both ways to give weights; --random-init together
    with weights is a contradiction.
    """
    tagged = name is not None and models.split_name(name)[1] is not None
    if random_init and (weights is not None or tagged):
        raise CheckpointError("--random-init contradicts the weights given (--weights or a .tag); pass one of them")
    if not random_init and weights is None and not tagged:
        own = [w.name for w in published.list_weights(models.split_name(name)[0] if name else None)]
        known = ", ".join(own[:4] or ["resnet20.cifar10_akamaster", "resnet18.imagenet1k_v1"])
        raise CheckpointError(
            f"{name or 'the model'} has no weights: pass --weights FILE or a tagged name ({known}), "
            "or --random-init for latency/memory work (its top-1 error then means nothing)"
        )
    return random_init


def resolve_weights(name: str) -> Path | None:
    """The verified file for a weights tag such as `resnet18.imagenet1k_v1` (None without a tag)."""
    base, tag = models.split_name(name)
    if tag is None:
        return None
    return published.fetch(published.get(base, tag))


def _is_url(weights: str | os.PathLike) -> bool:
    return str(weights).startswith(("http://", "https://"))


def _fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, replace_head: bool) -> None:
    own = model.state_dict()
    if replace_head:
        head = {k for k in sd if k.startswith("fc.")}
        if any(k in own and own[k].shape != sd[k].shape for k in head):
            log.info("replacing the classifier: %s has %d classes, the model %d",
                     source, sd["fc.weight"].shape[0], own["fc.weight"].shape[0])
            sd = {k: v for k, v in sd.items() if k not in head}
            sd.update({k: own[k] for k in head if k in own})
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{source} does not fit {model.cfg.name}: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys); check the model name and options"
        )
    for k, v in sd.items():
        if k == "fc.weight" and own[k].shape[1:] == v.shape[1:] and own[k].shape[0] != v.shape[0]:
            raise CheckpointError(
                f"{source} has {v.shape[0]} classes, the model asked for {own[k].shape[0]}: a new classifier "
                f"would be untrained here; fine-tune one first (edgeres train {model.cfg.name} --weights ... "
                f"--num-classes {own[k].shape[0]}) or drop --num-classes"
            )
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{source} does not fit {model.cfg.name}: {k} is {tuple(v.shape)} in the file, "
                f"{tuple(own[k].shape)} in the model; check --num-classes / --width"
            )
    model.load_state_dict(sd, strict=False)


def load_model(
    name: str | None,
    weights: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    new_head: bool = True,
    **arch,
) -> nn.Module:
    """Build `name` and load weights from a file, a URL or a weights tag in the name.

    A tag (`resnet18.imagenet1k_v1`) sets the model's defaults from its published record: input size,
    preprocessing, class names. An edgeres checkpoint names its own model, preprocessing and pruned
    shape, and wins over the tag. `num_classes` different from the weights' replaces the classifier and
    keeps the rest (transfer learning; the class names then come from the data); with `new_head=False`
    (evaluation, export: an untrained classifier would be garbage) it is an error.
    """
    record = None
    if name is not None and (tag := models.split_name(name)[1]) is not None:
        record = published.get(models.split_name(name)[0], tag)
    ckpt = None
    source = None
    if weights is not None:
        path = published.fetch_url(str(weights)) if _is_url(weights) else weights
        ckpt, source = read_checkpoint(path), str(weights)
    elif record is not None:
        ckpt, source = read_checkpoint(published.fetch(record)), record.name
    if name is None:
        if ckpt is None or ckpt.model is None:
            raise CheckpointError("no model name given and the checkpoint does not name one; pass MODEL")
        name = ckpt.model
    base = models.split_name(name)[0]
    opts = {k: v for k, v in arch.items() if v is not None}  # unset CLI options must not hide the saved ones
    if ckpt is not None and ckpt.cfg:
        saved = ckpt.cfg
        opts = {**saved.get("arch", {}), **opts}
        opts.setdefault("input_size", saved.get("input_size"))
        opts.setdefault("dataset", saved.get("dataset"))
    elif record is not None:
        opts = {**record.arch, **{k: v for k, v in opts.items() if v is not None}}
    if ckpt is not None and num_classes is None and "fc.weight" in ckpt.state_dict:
        num_classes = int(ckpt.state_dict["fc.weight"].shape[0])
    model = models.create(base, num_classes=num_classes, **opts)
    if ckpt is not None and ckpt.cfg:
        saved_pp = ckpt.cfg.get("preprocess")
        saved_classes = ckpt.cfg.get("classes")
        model.cfg = replace(
            model.cfg,
            mean=tuple(ckpt.cfg["mean"]),
            std=tuple(ckpt.cfg["std"]),
            preprocess=Preprocess.from_dict(saved_pp) if saved_pp else None,
            classes=tuple(saved_classes) if saved_classes and len(saved_classes) == model.cfg.num_classes
            else model.cfg.classes,
            weights=ckpt.cfg.get("weights") or source,
        )
    elif record is not None:
        pp = record.preprocess
        if model.cfg.input_size != record.input_size:  # --input-size asked for another resolution
            pp = replace(pp, input_size=model.cfg.input_size,
                         resize=max(model.cfg.input_size, round(model.cfg.input_size * pp.resize / pp.input_size)))
        model.cfg = replace(
            model.cfg, mean=pp.mean, std=pp.std, preprocess=pp,
            classes=record.classes if model.cfg.num_classes == record.num_classes else None,
            weights=record.name if source == record.name else f"{source} (as {record.name})",
        )
    elif ckpt is not None:
        model.cfg = replace(model.cfg, weights=source)
    if ckpt is not None and ckpt.pruned:
        from edgeres.compress.prune import apply_pruned_spec

        apply_pruned_spec(model, ckpt.pruned)
    if ckpt is not None:
        _fit_state_dict(model, ckpt.state_dict, source, replace_head=new_head)
        model.edgeres_untrained = bool((ckpt.extra or {}).get("random_init"))
    return model


def untrained(model: nn.Module) -> bool:
    """Whether `model`'s weights came from a checkpoint that records them as untrained (a --random-init export)."""
    return bool(getattr(model, "edgeres_untrained", False))


def checkpoint_dict(model: nn.Module, *, pruned: dict | None = None, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "model": model.cfg.name,
        "cfg": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "pruned": pruned,
        "extra": extra or {},
    }


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, pruned: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write an edgeres checkpoint atomically; it loads with weights_only=True."""
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(checkpoint_dict(model, pruned=pruned, extra=extra), tmp)
    return path
