"""Where edgeres INT8 loses time in ONNX Runtime on CPU, and three rewrites that win it back (measured here first).

ORT runs a CPU-flavour Q/DQ model as QLinear* kernels, channels-last (microsoft/onnxruntime#5824). What it
cannot fuse runs in FP32 between DequantizeLinear and QuantizeLinear, wrapped in NHWC<->NCHW Transposes.

A. Pre-activation WRN: the BN-ReLU after each residual add has no conv to fold into (compress.fold_bn), so
   NNCF leaves it unquantized and ORT runs DQ -> Add -> BatchNormalization -> Q with Transposes around it.
   Written as the equivalent depthwise 1x1 conv (what ORT's own NCHWc optimizer does for FP32,
   microsoft/onnxruntime#2855), NNCF quantizes it: add -> QLinearAdd, BN+ReLU -> QLinearConv, no FP32 island
   and no Transposes. Cost: one more 8-bit rounding (the add output); the "BN" weights are exact (one value
   per channel, per-channel scale). NNCF would give a depthwise conv's input per-channel activation scales,
   which QLinearAdd cannot take, so activations are asked per-tensor (they are per-tensor everywhere else).
B. DequantizeLinear before pure data movement (Slice, Pad, Flatten, Reshape, Transpose, ...) blocks fusion:
   the option-A shortcut's DQ -> Slice -> Pad -> Add stays FP32 and DQ -> Flatten -> Gemm stays an FP32 Gemm.
   Moving the DQ after the data movement (Pad fills with the zero point: exact) gives QLinearAdd and QGemm.
C. With int8 weights of zero point 0, ORT's QLinearConv takes MLAS's symmetric conv kernels (AVX512-VNNI);
   with one non-zero weight zero point for all channels it takes the general QGEMM, which has Intel AMX
   kernels (microsoft/onnxruntime#14042). On AMX CPUs that is ~1.2-2.2x faster per conv when the reduction
   K = C_in*kh*kw >= 256 and C_out >= 64, slower below. Shifting those weights by -1 with zero point -1 is
   exact (NNCF's weights lie in [-127, 127]). Applied only where the host reports amx_int8.

    python benchmarks/wrn_gap.py [--model wrn-16-4] [--weights CKPT] [--eval 1000] [--runs 200] [--json OUT]

builds the model's INT8 ONNX as the pipeline does, then each rewrite alone and all together; prints the op
types and FP32 islands ORT runs, interleaved batch-1 / batch-64 timings and top-1 through ONNX Runtime.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Data movement only: a per-tensor quantized tensor passes through with the same values on the same grid.
SINK_THROUGH = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad"}
AMX_MIN_K = 256  # C_in * kh * kw below which MLAS's VNNI symmetric conv beats its AMX QGEMM (measured)
AMX_MIN_OUT = 64


# ---------------------------------------------------------------- A: unfoldable BN as a depthwise conv


def bn_as_depthwise(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, int]:
    """Copy of `model` with each BN that cannot fold into a conv replaced by the same affine map as a depthwise
    1x1 Conv2d (weight gamma / sqrt(var + eps), bias beta - mean * weight); returns it and how many were replaced."""
    from edgeres.compress.fold_bn import find_conv_bn_pairs

    out = copy.deepcopy(model).eval()
    _, unfoldable = find_conv_bn_pairs(out, example_input)
    with torch.no_grad():
        for name in unfoldable:
            bn = out.get_submodule(name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True)
            conv.weight.copy_(scale.reshape(-1, 1, 1, 1))
            conv.bias.copy_(bn.bias - bn.running_mean * scale)
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, conv)
    if hasattr(model, "cfg"):
        out.cfg = model.cfg
    return out, len(unfoldable)


def ptq_bn_as_conv(model: nn.Module, calib_batches: list[torch.Tensor], *, example_input: torch.Tensor) -> nn.Module:
    """compress.quantize.ptq with unfoldable BNs as depthwise convs and per-tensor activation quantizers."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    from edgeres.compress.fold_bn import fold_bn
    from edgeres.compress.quantize import make_activations_signed

    converted, _ = bn_as_depthwise(model, example_input)
    folded = fold_bn(converted, example_input=example_input).model
    qmodel = nncf.quantize(  # compress.quantize.ptq's call (fast bias correction on), activations per-tensor
        folded,
        nncf.Dataset(list(calib_batches)),
        subset_size=len(calib_batches),
        advanced_parameters=AdvancedQuantizationParameters(
            disable_bias_correction=False,
            activations_quantization_params=QuantizationParameters(per_channel=False),
        ),
    )
    make_activations_signed(qmodel)
    if hasattr(model, "cfg"):
        qmodel.cfg = model.cfg
    return qmodel.eval()


# ---------------------------------------------------------------- B: DequantizeLinear after data movement


def _sinkable(gr, dq) -> list:
    """Readers of `dq` that only move data and take it as their data input (input 0 only)."""
    from edgeres.export import _attr

    if dq.input[0] in gr.inits or dq.output[0] in gr.outputs:
        return []
    scale = gr.const(dq.input[1])
    if scale is None or scale.size != 1:  # per-channel axes would move with Transpose/Reshape
        return []
    out = []
    for c in gr.consumers[dq.output[0]]:
        if c.op_type not in SINK_THROUGH or c.input[0] != dq.output[0] or dq.output[0] in c.input[1:]:
            continue
        if c.op_type == "Pad":
            mode = _attr(c, "mode", b"constant")
            value = gr.const(c.input[2]) if len(c.input) > 2 and c.input[2] else np.zeros(())
            if mode not in (b"constant", "constant") or value is None or np.any(value != 0):
                continue
        out.append(c)
    return out


def sink_dequantize(onnx_model):
    """Move each activation DequantizeLinear after the Slice/Pad/Flatten/... that read it; return (model, moved).

    Exact: those ops only move values, and Pad fills with the zero point, which dequantizes to 0.0. Then ORT
    fuses the DQ with what follows (DQ -> Add -> Q into QLinearAdd, DQ -> Gemm into QGemm); Gemm biases
    become int32 once their input comes from a DQ.
    """
    import onnx

    from edgeres.export import _clear_value_info, _Graph, _int32_bias, _zero_point

    model = copy.deepcopy(onnx_model)
    gr = _Graph(model)
    moved = 0
    while True:
        found = next(((dq, c) for dq in gr.g.node if dq.op_type == "DequantizeLinear" for c in _sinkable(gr, dq)),
                     None)
        if found is None:
            break
        dq, c = found
        out = c.output[0]
        quantized = gr.unique(f"{out}_quantized")
        c.input[0] = dq.input[0]
        c.output[0] = quantized
        if c.op_type == "Pad":
            zp = _zero_point(gr, dq).reshape(())
            if np.any(zp != 0) or (len(c.input) > 2 and c.input[2]):
                while len(c.input) < 3:
                    c.input.append("")
                c.input[2] = gr.add_init(f"{c.name or out}_pad_value", zp)
        new = onnx.helper.make_node("DequantizeLinear", [quantized, *dq.input[1:]], [out], name=gr.unique(f"{out}_dq"))
        gr.g.node.insert(list(gr.g.node).index(c) + 1, new)
        if len(gr.consumers[dq.output[0]]) == 1:
            gr.g.node.remove(dq)
        _clear_value_info(model, {out, quantized})
        gr.refresh()
        moved += 1
    gr.prune_unused()
    _int32_bias(gr)
    return model, moved


# ---------------------------------------------------------------- C: AMX-friendly weight zero points


def host_has_amx_int8() -> bool:
    """Whether this CPU (Linux /proc/cpuinfo) has Intel AMX int8 tiles."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    return any(line.startswith("flags") and "amx_int8" in line.split() for line in cpuinfo.read_text().splitlines())


def amx_conv_weights(onnx_model, *, min_k: int = AMX_MIN_K, min_out: int = AMX_MIN_OUT):
    """Give wide convs' int8 weights zero point -1 (values shifted by -1: exact); return (model, convs changed).

    ORT's QLinearConv then uses MLAS's general QGEMM (AMX kernels) instead of its symmetric VNNI conv.
    """
    from edgeres.export import _attr, _Graph, _is_weight_dq, _zero_point

    model = copy.deepcopy(onnx_model)
    gr = _Graph(model)
    changed = 0
    for conv in [n for n in gr.g.node if n.op_type == "Conv"]:
        dq = gr.producer.get(conv.input[1])
        if dq is None or not _is_weight_dq(gr, dq) or len(gr.consumers[dq.input[0]]) != 1:
            continue
        w, scale = gr.const(dq.input[0]), gr.const(dq.input[1])
        if w.dtype != np.int8 or w.ndim < 3 or _attr(conv, "group", 1) != 1 or np.any(_zero_point(gr, dq) != 0):
            continue
        if int(np.prod(w.shape[1:])) < min_k or w.shape[0] < min_out:
            continue
        shift = -1 if w.min() > -128 else 1 if w.max() < 127 else 0
        if shift == 0:
            continue
        shifted = gr.add_init(f"{dq.input[0]}_amx", (w.astype(np.int16) + shift).astype(np.int8))
        zero_point = gr.add_init(f"{dq.input[0]}_amx_zero_point", np.full(scale.shape, shift, np.int8))
        dq.input[0] = shifted
        if len(dq.input) < 3:
            dq.input.append(zero_point)
        else:
            dq.input[2] = zero_point
        changed += 1
    gr.prune_unused()
    return model, changed


# ---------------------------------------------------------------- writing and inspecting


def write_int8_onnx(qmodel: nn.Module, path: Path, input_size: int, *, sink: bool = False,
                    amx: bool = False) -> tuple[Path, dict]:
    """strip -> export_onnx -> to_cpu_flavour (the pipeline's CPU INT8 writer), then rewrites B / C if asked."""
    import onnx

    from edgeres.compress.quantize import strip
    from edgeres.export import export_onnx, save_onnx, short_tensor_names, to_cpu_flavour

    example = torch.zeros(1, 3, input_size, input_size)
    raw = path.with_name(path.stem + ".raw.onnx")
    export_onnx(strip(qmodel, example), raw, input_size=input_size)
    model = to_cpu_flavour(onnx.load(str(raw)))
    raw.unlink()
    applied = {}
    if sink:
        model, applied["dequantize_moved"] = sink_dequantize(model)
    if amx:
        model, applied["amx_convs"] = amx_conv_weights(model)
    save_onnx(short_tensor_names(model) if applied else model, path)
    return path, applied


def optimized_graph(onnx_path: Path, threads: int | None = None):
    """The graph ONNX Runtime runs after all its optimizations (Q/DQ fusion, NHWC, NCHWc)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath).graph


def fp32_islands(graph) -> list[str]:
    """Op runs between a DequantizeLinear (or the graph input) and a QuantizeLinear, e.g. 'DQ Add BatchNorm... Q'."""
    producer = {o: n for n in graph.node for o in n.output}
    islands = []
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        chain, node = [], producer.get(q.input[0])
        while node is not None and node.op_type != "DequantizeLinear" and not node.op_type.startswith("QLinear"):
            chain.append(node.op_type)
            node = producer.get(node.input[0]) if node.input else None
        if chain:
            islands.append(" ".join(["DQ", *reversed(chain), "Q"]))
    return islands


def graph_summary(onnx_path: Path, threads: int | None = None) -> dict:
    """Op types ORT runs, how many are QLinear/QGemm, Transposes, and the FP32 islands between DQ and Q."""
    graph = optimized_graph(onnx_path, threads)
    ops = collections.Counter(n.op_type for n in graph.node)
    return {
        "op_types": dict(ops.most_common()),
        "quantized_ops": sum(v for k, v in ops.items() if k.startswith("QLinear") or k == "QGemm"),
        "transposes": ops.get("Transpose", 0),
        "fp32_islands": dict(collections.Counter(fp32_islands(graph)).most_common()),
    }


# ---------------------------------------------------------------- ablation


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


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
    from cpu_int8 import calibration_set, fp32_model, interleaved, load_split

    from edgeres.compress.quantize import ptq
    from edgeres.export import export_onnx

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
    amx = host_has_amx_int8()
    result: dict = {"model": model.cfg.name, "weights": weights_note, "calibration": calib_note, "threads": threads,
                    "host_amx_int8": amx}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"fp32": export_onnx(model, tmp / "fp32.onnx", input_size=size)}
        base = ptq(model, calib, example_input=example)
        paths["int8"], _ = write_int8_onnx(base, tmp / "int8.onnx", size)
        converted, n_bn = bn_as_depthwise(model, example)
        with torch.no_grad():
            x = torch.randn(8, 3, size, size)
            diff = float((converted(x) - model(x)).abs().max())
        result["bn_as_depthwise"] = {"replaced": n_bn, "fp32_max_abs_logit_diff": diff}
        applied = {}
        dw = ptq_bn_as_conv(model, calib, example_input=example) if n_bn else None
        if dw is not None:
            paths["int8 +A dwBN"], applied["int8 +A dwBN"] = write_int8_onnx(dw, tmp / "a.onnx", size)
        paths["int8 +B sink DQ"], applied["int8 +B sink DQ"] = write_int8_onnx(base, tmp / "b.onnx", size, sink=True)
        if amx:
            paths["int8 +C AMX"], applied["int8 +C AMX"] = write_int8_onnx(base, tmp / "c.onnx", size, amx=True)
        if dw is not None or amx:
            paths["int8 +A+B+C"], applied["int8 +A+B+C"] = write_int8_onnx(dw or base, tmp / "abc.onnx", size,
                                                                           sink=True, amx=amx)
        result["applied"] = applied
        result["graphs"] = {k: graph_summary(v, threads) for k, v in paths.items() if k != "fp32"}
        runners = {k: _runner(_session(v, threads)) for k, v in paths.items()}
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
