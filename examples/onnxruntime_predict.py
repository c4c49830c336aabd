#!/usr/bin/env python3
"""Classify images with an edgeres model.onnx using only onnxruntime, numpy and Pillow (no edgeres).

Everything this needs is inside the ONNX file: its metadata entry `edgeres` (JSON) names the classes,
the input, and every preprocessing step. This file re-implements those steps from that record alone;
edgeres's tests hold it pixel for pixel against edgeres's own preprocessing.

    python onnxruntime_predict.py model.onnx cat.jpg dog.png [--top 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def read_metadata(session: ort.InferenceSession) -> dict:
    """The artifact's own record: classes, input, preprocessing."""
    meta = session.get_modelmeta().custom_metadata_map
    if "edgeres" not in meta:
        sys.exit("error: this ONNX carries no edgeres metadata; export it with a recent edgeres")
    return json.loads(meta["edgeres"])


def load_rgb(path: str) -> Image.Image:
    """Decode any image to RGB: EXIF orientation applied, transparency and 16-bit grey handled."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")
        return im.convert("RGB")


def preprocess(path: str, pre: dict) -> np.ndarray:
    """Resize the shorter side, centre-crop, scale, normalise: float32 CHW, as the record says."""
    if pre["color"] != "RGB" or pre["layout"] != "NCHW" or not pre["antialias"]:
        sys.exit(f"error: unsupported preprocessing {pre}")
    img = load_rgb(path)
    w, h = img.size
    shorter = pre["resize_shorter_side"]
    # the shorter side becomes `shorter`, the longer one is scaled and truncated (torchvision's Resize)
    size = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
    if size != (w, h):
        img = img.resize(size, FILTERS[pre["interpolation"]])  # Pillow antialiases when it shrinks
    w, h = img.size
    crop = pre["center_crop"]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(3, 1, 1)
    return ((x.astype(np.float32) / np.float32(1.0 / pre["scale"])) - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def predict(model: str, images: list[str], top: int = 5) -> list[dict]:
    """Top-`top` classes of each image, run one at a time."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    classes = meta["classes"] or [f"class {i}" for i in range(meta["num_classes"])]
    results = []
    for path in images:
        x = preprocess(path, meta["preprocess"])[None]
        logits = session.run([meta["output"]["name"]], {meta["input"]["name"]: x})[0][0]
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")[:top]
        results.append({"image": path, "top": [{"index": int(i), "class": classes[i], "probability": float(probs[i])}
                                               for i in order]})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    results = predict(args.model, args.images, args.top)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['probability']:.4f}  {t['class']} ({t['index']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
