"""manifest.json: an export folder's record of what it holds, written last (its presence means the folder is
whole) and read back by the one function here.

The record: format, model, target, runtime, precision, input/output names and shape, preprocessing, the
model's config, what the export adds (classes, data, pruning, quantization, validation, bundle facts),
every other file's sha256 and bytes, library versions and the time it was made.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from edgeres.errors import EdgeresError
from edgeres.io import atomic_write, sha256sum

NAME = "manifest.json"
FORMAT = "edgeres-export/1"


def versions() -> dict:
    """The versions of Python and the libraries an export was made with."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("edgeres", "torch", "nncf", "onnx", "onnxruntime", "torch-pruning", "openvino"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def write(folder: str | os.PathLike, *, cfg, target: str, runtime: str, precision: str,
          extra: dict[str, Any]) -> Path:
    """Write `folder`/manifest.json for a model of config `cfg` exported for `target`; call it last."""
    folder = Path(folder)
    files = {p.name: {"sha256": sha256sum(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != NAME}
    record = {
        "format": FORMAT,
        "model": cfg.name,
        "target": target,
        "runtime": runtime,
        "precision": precision,
        "input_name": "input",
        "output_name": "logits",
        "input_shape": ["batch", 3, cfg.input_size, cfg.input_size],
        "preprocessing": {"layout": "NCHW", "channels": "RGB", "scale": "1/255", "mean": list(cfg.mean),
                          "std": list(cfg.std)},
        "model_cfg": cfg.to_dict(),
        **extra,
        "files": files,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = folder / NAME
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return path


def read(folder: str | os.PathLike) -> dict | None:
    """The manifest of export folder `folder`; None where there is none, a one-line error where it is damaged."""
    path = Path(folder) / NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeresError(f"{path} is not an edgeres export manifest ({exc}); export again") from exc
    if not isinstance(record, dict):
        raise EdgeresError(f"{path} is not an edgeres export manifest (not a JSON object); export again")
    return record


def input_shape(folder: str | os.PathLike) -> list[int] | None:
    """(C, H, W) an export folder's models take, from its manifest; None without a manifest that says."""
    record = read(folder)
    shape = record.get("input_shape") if record else None
    if not shape:
        return None
    try:
        return [int(v) for v in shape[-3:]]
    except (ValueError, TypeError) as exc:
        raise EdgeresError(f"{Path(folder) / NAME} is not an edgeres export manifest ({exc}); export again") from exc
