"""Where edgeres INT8 loses time in ONNX Runtime on CPU: the library's CPU rewrites toggled one at a time.

ORT runs a CPU-flavour Q/DQ model as QLinear* kernels, channels-last (microsoft/onnxruntime#5824). What it
cannot fuse runs in FP32 between DequantizeLinear and QuantizeLinear, wrapped in NHWC<->NCHW Transposes.
edgeres's pipeline already applies the rewrites that remove those; this study switches off what the library
lets it switch off and shows what each one buys:

A. Pre-activation WRN: the BN-ReLU after each residual add has no conv to fold into. With
   `QuantizeOptions(bn_as_conv=False)` NNCF leaves it unquantized and ORT runs DQ -> Add -> BatchNormalization
   -> Q with Transposes around it; the default (`fold_bn(..., depthwise=True)`) writes it as a depthwise 1x1
   conv that NNCF quantizes (QLinearAdd + QLinearConv, no FP32 island). Variant "int8 BN kept" vs "int8".
B. `backends.ort.to_cpu_flavour` moves DequantizeLinear past pure data movement (Slice, Pad, Flatten...) so the
   option-A shortcut and the classifier fuse (QLinearAdd, QGemm). The library exposes no switch for it, so
   every variant here has it; this study has no variant without it.
C. `backends.ort.amx_conv_weights`: wide convs get weight zero point -1 so ORT's QLinearConv takes MLAS's AMX QGEMM
   (microsoft/onnxruntime#14042). backends/ort.py applies it at load time on AMX hosts; here sessions are plain
   ORT sessions, so "int8" runs without it and "int8 +AMX" (AMX hosts only) with it.

    python benchmarks/wrn_gap.py [--model wrn-16-4] [--weights CKPT] [--eval 1000] [--runs 200] [--json OUT]

builds the model's INT8 ONNX as the pipeline does ("int8") and the variants; prints the op types and FP32
islands ORT runs, interleaved batch-1 / batch-64 timings and top-1 through ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------- writing and inspecting










# ---------------------------------------------------------------- ablation


def _runner(session):
    return lambda a: session.run(None, {"input": a})[0]


def _eval(runners: dict, model: nn.Module, ds) -> dict:
    """Top-1 of each runner on `ds`, its argmax agreement with the PyTorch FP32 model, and logit drift vs 'int8'."""
    from edgeres.data import batches

    preds = {k: [] for k in ["torch fp32", *runners]}
    logits = {k: [] for k in runners}
    labels = []
    for x, y in batches(ds, 250, mean=model.cfg.mean, std=model.cfg.std):
        with torch.inference_mode():
            preds["torch fp32"].append(model(x).argmax(1).numpy())
        for k, run in runners.items():
            logits[k].append(run(x.numpy()))
            preds[k].append(logits[k][-1].argmax(1))
        labels.append(y.numpy())
    label = np.concatenate(labels)
    ref = np.concatenate(preds["torch fp32"])
    base = np.concatenate(logits["int8"]) if "int8" in logits else None
    out = {}
    for k, p in preds.items():
        pred = np.concatenate(p)
        row = {"images": int(len(label)), "top1_accuracy": round(float((pred == label).mean() * 100), 2),
               "agreement_with_torch_fp32": round(float((pred == ref).mean() * 100), 2)}
        if k in logits and base is not None:
            row["max_abs_logit_diff_vs_int8"] = round(float(np.abs(np.concatenate(logits[k]) - base).max()), 5)
        out[k] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from _common import (
        _ort_session,
        calibration_set,
        fp32_model,
        graph_summary,
        interleaved,
        load_split,
        write_int8_onnx,
    )

    from edgeres.compress.fold_bn import fold_bn
    from edgeres.compress.quantize import QuantizeOptions, ptq
    from edgeres.export import export_onnx
    from edgeres.hostcpu import has_amx_int8

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wrn-16-4")
    p.add_argument("--weights", help="checkpoint (default: pretrained where known, else random init)")
    p.add_argument("--eval", type=int, default=1000, help="test images for top-1 (0: skip)")
    p.add_argument("--calib", type=int, default=128, help="calibration images")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per variant (batch 64: runs/20)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model, weights_note = fp32_model(args.model, args.weights)
    size = model.cfg.input_size
    example = torch.zeros(1, 3, size, size)
    calib, calib_note = calibration_set(model, args.calib)
    amx = has_amx_int8()
    result: dict = {"model": model.cfg.name, "weights": weights_note, "calibration": calib_note, "threads": threads,
                    "host_amx_int8": amx}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"fp32": export_onnx(model, tmp / "fp32.onnx", input_size=size)}
        base = ptq(model, calib, example_input=example)
        paths["int8"], _ = write_int8_onnx(base, tmp / "int8.onnx", size)
        report = fold_bn(model, example_input=example, depthwise=True)
        with torch.no_grad():
            x = torch.randn(8, 3, size, size)
            diff = float((report.model(x) - model(x)).abs().max())
        result["bn_as_depthwise"] = {"replaced": report.unfoldable, "fp32_max_abs_logit_diff": diff}
        applied = {}
        if report.unfoldable:
            kept = ptq(model, calib, example_input=example, options=QuantizeOptions(bn_as_conv=False))
            paths["int8 BN kept"], applied["int8 BN kept"] = write_int8_onnx(kept, tmp / "bn_kept.onnx", size)
        if amx:
            paths["int8 +AMX"], applied["int8 +AMX"] = write_int8_onnx(base, tmp / "amx.onnx", size, amx=True)
        result["applied"] = applied
        result["graphs"] = {k: graph_summary(v, threads) for k, v in paths.items() if k != "fp32"}
        runners = {k: _runner(_ort_session(v, threads)) for k, v in paths.items()}
        result["timing"] = {}
        for batch, runs in ((1, args.runs), (64, max(args.runs // 20, 5))):
            print(f"timing batch {batch}", file=sys.stderr)
            stats = interleaved(runners, batch, size, runs=runs, warmup=5, rounds=5)
            result["timing"][f"batch{batch}"] = {
                k: {"p50_ms": v.p50_ms, "throughput_ips": v.throughput_ips,
                    "speedup_vs_int8": round(stats["int8"].p50_ms / v.p50_ms, 3) if batch == 1
                    else round(v.throughput_ips / stats["int8"].throughput_ips, 3)}
                for k, v in stats.items()
            }
        test = load_split("test", args.eval) if args.eval else None
        if test is not None:
            print(f"top-1 on {len(test)} test images", file=sys.stderr)
            result["top1"] = _eval({k: v for k, v in runners.items() if k != "fp32"}, model, test)
    print(json.dumps(result, indent=2))
    if args.json:
        from edgeres.io import atomic_write

        with atomic_write(args.json) as f:
            f.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
