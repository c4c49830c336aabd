"""The 224 px journey on this machine: export ResNet-18/50 to each target, INT8 against FP32 on real photographs.

    python benchmarks/export_224.py --data FOLDER [--models resnet18,resnet50]
        [--targets cpu,cpu-openvino,jetson-orin-nano] [--runs 30] [--out DIR] [--json OUT]

No ImageNet-trained weights exist on these machines, so each model is a torchvision-layout checkpoint of
RANDOM weights written here (seed 0) and loaded as `MODEL.imagenet1k_v1 --weights FILE`: the tag gives the
224 px ImageNet preprocessing and the 1,000 class names; the weights carry no knowledge. Every figure that
depends on the weights (top-1, INT8-vs-FP32 agreement) is therefore noise, not an accuracy; size and latency
are what these networks cost. FOLDER is an ImageFolder tree (train/ for calibration, val/ to evaluate).
Latency: batch 1, `--runs` timed runs after warm-up, through the target's runtime where it runs here
(ONNX Runtime, OpenVINO); the Jetson bundle is checked through ONNX Runtime and timed on the device only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgeres import data, models
from edgeres.backends.base import get_backend, open_artifact
from edgeres.latency import BenchOptions
from edgeres.pipeline import ExportOptions, export


def random_torchvision_checkpoint(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(models.create(name, num_classes=1000, input_size=224).state_dict(), path)
    return path


def top1_agreement(fp32: Path, int8: Path, runtime: str, ds) -> dict:
    """INT8 against FP32 through the same runtime: top-1 agreement, how many distinct classes FP32 predicts
    (a random network often predicts one class for every image, which makes agreement trivially 100 %), and
    the per-image correlation of the mean-centred logits (what agreement cannot show then)."""
    backend = get_backend(runtime)
    a, b = backend.load(open_artifact(fp32)), backend.load(open_artifact(int8))
    pp = ds.preprocess
    top_a, top_b, corr = [], [], []
    for x, _ in data.batches(ds, 25, mean=pp.mean, std=pp.std):
        ya, yb = backend.run(a, x.numpy()), backend.run(b, x.numpy())
        top_a += ya.argmax(1).tolist()
        top_b += yb.argmax(1).tolist()
        ca, cb = ya - ya.mean(1, keepdims=True), yb - yb.mean(1, keepdims=True)
        corr += ((ca * cb).sum(1) / np.sqrt((ca * ca).sum(1) * (cb * cb).sum(1))).tolist()
    same = sum(p == q for p, q in zip(top_a, top_b, strict=True))
    return {"images": len(top_a), "top1_agreement_pct": round(100 * same / len(top_a), 2),
            "distinct_fp32_top1": len(set(top_a)), "logit_correlation_mean": round(float(np.mean(corr)), 5),
            "logit_correlation_min": round(float(np.min(corr)), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--targets", default="cpu,cpu-openvino,jetson-orin-nano")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("out/export_224"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        ckpt = random_torchvision_checkpoint(name, args.out / f"{name}-random-weights.pth")
        for target in args.targets.split(","):
            folder = args.out / f"{name}-{target}-int8"
            opts = ExportOptions(target=target, int8=True, bench=BenchOptions(batch_sizes=(1,), warmup=5,
                                                                              runs=args.runs))
            report = export(f"{name}.imagenet1k_v1", weights=ckpt, data_spec=args.data, out=folder, options=opts)
            manifest = json.loads((folder / "manifest.json").read_text())
            rows = [{k: getattr(r, k) for k in ("variant", "runtime", "precision", "size_mb", "latency_ms_p50",
                                                "throughput_ips", "top1_accuracy", "eval_images", "file")}
                    for r in report.rows]
            runtime = report.rows[-1].runtime
            val = data.for_model(models.create(name, num_classes=1000, input_size=224).cfg, args.data, "test")
            fp32_file, int8_file = folder / report.rows[0].file, folder / report.rows[-1].file
            agreement = top1_agreement(fp32_file, int8_file, runtime, val)
            results.append({"model": name, "target": target, "rows": rows, "int8_vs_fp32": agreement,
                            "classes": len(manifest["classes"]), "notes": report.notes})
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
