"""edgeres' OpenVINO INT8 artifact against OpenVINO's own NNCF PTQ path and against ONNX Runtime INT8.

One calibration set (calibration/default.toml) feeds both quantizers:
- edgeres: NNCF PTQ on the (BN-folded) torch model -> Q/DQ ONNX -> OpenVINO flavour -> IR (backends.openvino);
  the same Q/DQ export in the CPU flavour is the ONNX Runtime artifact;
- OpenVINO's own path: `nncf.quantize(ov.convert_model(fp32.onnx))` -> IR.
Every IR loads through `OpenVINOBackend` (INFERENCE_PRECISION_HINT f32, LATENCY, same threads). Timings
are taken side by side in one process: blocks of batch-1 calls and batch-64 calls rotate over the models
for `--rounds` rounds, so load from other jobs falls on all of them alike; p50 over all samples. A
pause before each block lets ONNX Runtime's spinning worker threads go idle, so no model pays for the last one.
Speed against NNCF's own IR is the median of per-round ratios with a 95% bootstrap interval over rounds.

    python benchmarks/openvino_vs_nncf.py [--model resnet20.cifar10_akamaster] [--eval 10000] [--rounds 20]

prints the runtime layer precisions of each artifact, top-1 on the test split, batch-1 p50 and batch-64 throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeres import data, targets
from edgeres import export as E
from edgeres.backends.base import Artifact, RuntimeOptions, get_backend
from edgeres.backends.openvino import ir_bytes, to_openvino_flavour
from edgeres.backends.ort import to_cpu_flavour
from edgeres.bench import speed_ratio
from edgeres.calibration import calibration_batches, load_calibration
from edgeres.checkpoint import load_model
from edgeres.compress.quantize import ptq, strip
from edgeres.evaluate import evaluate_session


def build(model_name: str, tmp: Path, weights: str | None = None
          ) -> tuple[torch.nn.Module, dict[str, tuple[str, Artifact]]]:
    import nncf
    import openvino as ov

    net = load_model(model_name, weights).eval()
    cfg = net.cfg
    train = data.load_dataset(cfg.dataset, "train", image_size=cfg.input_size)
    calib = calibration_batches(load_calibration("default"), train, cfg.mean, cfg.std)
    example = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
    E.export_onnx(net, tmp / "fp32.onnx", input_size=cfg.input_size)
    raw = onnx.load(str(E.export_onnx(strip(ptq(net, calib, example_input=example), example), tmp / "raw.onnx",
                                      input_size=cfg.input_size)))
    E.save_onnx(to_cpu_flavour(raw), tmp / "int8_cpu.onnx")
    E.save_onnx(to_openvino_flavour(raw), tmp / "int8_openvino.onnx")
    native = nncf.quantize(ov.convert_model(str(tmp / "fp32.onnx")), nncf.Dataset([b.numpy() for b in calib]),
                           subset_size=len(calib))  # items are batches: all calibration images
    ov.save_model(native, str(tmp / "nncf_native.xml"), compress_to_fp16=False)

    ort, ovb = get_backend("onnxruntime"), get_backend("openvino")
    cpu, cpu_ov = targets.load("cpu"), targets.load("cpu-openvino")
    arts = {
        "ORT fp32": ort.compile(tmp / "fp32.onnx", cpu, tmp / "ort_fp32.onnx"),
        "ORT int8 (edgeres)": ort.compile(tmp / "int8_cpu.onnx", cpu, tmp / "ort_int8.onnx"),
        "OV fp32 (edgeres)": ovb.compile(tmp / "fp32.onnx", cpu_ov, tmp / "ov_fp32.xml"),
        "OV int8 (edgeres)": ovb.compile(tmp / "int8_openvino.onnx", cpu_ov, tmp / "ov_int8.xml"),
        "OV int8 (NNCF native)": Artifact(tmp / "nncf_native.xml", "openvino", "int8"),
    }
    return net, arts


REFERENCE = "OV int8 (NNCF native)"


def timings(sessions: dict, shape: tuple[int, ...], rounds: int) -> dict[str, dict]:
    """Per model: batch-1 p50, batch-64 throughput, and its speed relative to REFERENCE round by round.

    Each round times every model in turn (order reversed every other round), so a ratio taken within one
    round compares models under the same machine conditions; the median of those per-round ratios, a 95%
    bootstrap interval over rounds and the share of rounds the model was at least as fast say how sure it is.
    """
    rng = np.random.default_rng(0)
    x1, x64 = rng.standard_normal((1, *shape), dtype=np.float32), rng.standard_normal((64, *shape), dtype=np.float32)
    t1: dict[str, list[list[float]]] = {k: [] for k in sessions}
    t64: dict[str, list[list[float]]] = {k: [] for k in sessions}
    for backend, s in sessions.values():  # warm-up
        for x in (x1,) * 10 + (x64,) * 2:
            backend.run(s, x)
    order = list(sessions)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            backend, s = sessions[name]
            for x, out, n in ((x1, t1[name], 25), (x64, t64[name], 3)):
                time.sleep(0.5)  # let the previous runtime's worker threads stop spinning (ONNX Runtime spins)
                backend.run(s, x)  # one untimed call after switching models
                samples = []
                for _ in range(n):
                    t = time.perf_counter()
                    backend.run(s, x)
                    samples.append(time.perf_counter() - t)
                out.append(samples)
    result = {}
    for k in sessions:
        row = {"p50_ms_b1": round(float(np.median(np.concatenate(t1[k]))) * 1e3, 3),
               "throughput_b64": round(64 / float(np.median(np.concatenate(t64[k]))), 1)}
        if REFERENCE in sessions:
            row["vs_nncf_native_b1"] = speed_ratio(t1[REFERENCE], t1[k])
            row["vs_nncf_native_b64"] = speed_ratio(t64[REFERENCE], t64[k])
        result[k] = row
    return result


def main(argv: list[str] | None = None) -> int:
    from _common import machine, versions  # before any work: a broken setup fails at once

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20.cifar10_akamaster")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the model name's own, else random init)")
    ap.add_argument("--eval", type=int, default=10000, help="test images for top-1 (0: skip)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        net, arts = build(args.model, Path(d), args.weights)
        cfg = net.cfg
        opts = RuntimeOptions(threads=args.threads)
        sessions = {k: (get_backend(a.runtime), get_backend(a.runtime).load(a, opts)) for k, a in arts.items()}
        rows = {}
        for k, a in arts.items():
            size = ir_bytes(a.path) if a.path.suffix == ".xml" else a.path.stat().st_size
            s = sessions[k][1]
            rows[k] = {"size_mb": round(size / 1e6, 3), "precision": getattr(s, "precision", None)}
        if args.eval:
            test = data.load_dataset(cfg.dataset, "test", image_size=cfg.input_size)
            test = data.subset(test, args.eval) if args.eval < len(test) else test
            for k, (backend, s) in sessions.items():
                rows[k]["top1_accuracy"] = evaluate_session(backend, s, test, mean=cfg.mean, std=cfg.std,
                                                            desc=k).top1_accuracy
        load = os.getloadavg()
        for k, v in timings(sessions, (3, cfg.input_size, cfg.input_size), args.rounds).items():
            rows[k].update(v)
    result = {"model": cfg.name, "cpus": len(os.sched_getaffinity(0)), "loadavg_before_timing": load,
              "machine": machine(), "versions": versions(), "rounds": args.rounds, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{cfg.name}: {result['cpus']} CPUs, load average {load[0]:.1f} before timing")
    print(f"{'artifact':24s} {'MB':>6s} {'top-1 %':>8s} {'b1 p50 ms':>10s} {'b64 img/s':>10s} "
          f"{'b1 x native [95% CI]':>22s} {'b64 x native [95% CI]':>22s}  runtime layers")
    for k, v in rows.items():
        p = v["precision"] or {}
        layers = f"int8 {p['int8_ops']} / fp32 {p['fp32_ops']} / bf16 {p['bf16_ops']}" if p else ""
        vs = [_ratio_text(v.get(f"vs_nncf_native_{b}")) for b in ("b1", "b64")]
        print(f"{k:24s} {v['size_mb']:6.3f} {v.get('top1_accuracy', float('nan')):8.2f} {v['p50_ms_b1']:10.3f} "
              f"{v['throughput_b64']:10.1f} {vs[0]:>22s} {vs[1]:>22s}  {layers}")
    return 0


def _ratio_text(r: dict | None) -> str:
    return f"{r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r else "-"


if __name__ == "__main__":
    raise SystemExit(main())
