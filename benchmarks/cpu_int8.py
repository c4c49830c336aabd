"""CPU INT8 side by side: PyTorch eager FP32, ONNX Runtime FP32, edgeres INT8, ORT quantize_static INT8, OpenVINO INT8.

    python benchmarks/cpu_int8.py [--models resnet20,wrn-16-4,resnet18] [--runs N] [--threads T] [--json OUT]

One process, one machine, the same thread count for every engine. Each model is built once in FP32
(the pretrained akamaster weights for resnet20 when EDGERES_DATA holds them, otherwise random init:
latency does not depend on weight values) and turned into:

1. PyTorch eager FP32 (torch.inference_mode), the unfused model as a user would run it;
2. ONNX Runtime FP32: edgeres.export.export_onnx, ORT_ENABLE_ALL;
3. edgeres INT8: compress.quantize.ptq -> strip -> export_onnx -> to_cpu_flavour, the pipeline's path (BNs
   that cannot fold quantized as depthwise convs, DequantizeLinear moved past data movement), loaded by
   backends.ort.OrtBackend (AMX-friendly weight zero points on AMX hosts);
4. ORT quantize_static INT8 on the FP32 ONNX: quant_pre_process, then QDQ, QUInt8 activations, QInt8
   per-channel weights, MinMax calibration (ORT's recommended CNN settings);
5. OpenVINO INT8: ov.convert_model(FP32 ONNX) -> nncf.quantize -> compile_model on CPU with
   INFERENCE_PRECISION_HINT f32, so the parts left in floating point are not silently run as bf16 on
   AMX/AVX512-BF16 CPUs (OpenVINO's default there); one compiled model per batch size (static shapes);

plus "edgeres INT8, OpenVINO target": the same quantized model in the OpenVINO flavour (what `--target cpu-openvino`
converts to IR), compiled by OpenVINO as in (5). benchmarks/wrn_gap.py
shows what each of (3)'s CPU rewrites buys.

Every INT8 flavour calibrates on the same images: 128 class-balanced CIFAR-10 training images
(calibration/default.toml's selection) when the data is there, else synthetic images. Timing is
interleaved: every engine warms up, then each round runs every engine in turn (order reversed every
other round) so machine noise hits all of them alike; batch-1 latency is the p50, batch-64 throughput
64 / median. Prints a table with ratios and writes JSON (--json). On a loaded machine PyTorch eager
suffers most (its OpenMP barriers wait for descheduled threads): take final figures on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _common import (  # noqa: F401  (the rest of the shared toolkit is reached through here by tests)
    PRETRAINED,
    SETTLE_S,
    Engine,
    Runner,
    _openvino_config,
    _openvino_engine,
    _openvino_precisions,
    _OpenVinoRunner,
    _ort_engine,
    _ort_session,
    calibration_set,
    edgeres_int8_engine,
    edgeres_on_openvino_engine,
    fp32_model,
    graph_summary,
    info,
    interleaved,
    interleaved_rounds,
    load_split,
    machine,
    openvino_int8_engine,
    ort_fp32_engine,
    ort_quantize_static_engine,
    pooled,
    torch_engine,
    versions,
    write_int8_onnx,
)

from edgeres.latency import LatencyStats

DEFAULT_MODELS = ("resnet20", "wrn-16-4", "resnet18")
BATCHES = (1, 64)
EVAL_BATCH = 100







# ---------------------------------------------------------------- model and data










# ---------------------------------------------------------------- engines


























# ---------------------------------------------------------------- measurement










def top1(engines: list[Engine], ds, mean, std) -> dict[str, dict]:
    """Top-1 of every engine on `ds`, and how often its argmax matches PyTorch eager FP32's."""
    from edgeres.data import batches

    preds = {e.key: [] for e in engines}
    labels = []
    for x, y in batches(ds, EVAL_BATCH, mean=mean, std=std):
        a = np.ascontiguousarray(x.numpy())
        for e in engines:
            preds[e.key].append(e.run(a).argmax(1))
        labels.append(y.numpy())
    label = np.concatenate(labels)
    ref = np.concatenate(preds[engines[0].key])
    out = {}
    for key, p in preds.items():
        pred = np.concatenate(p)
        out[key] = {"images": int(len(label)), "top1_accuracy": round(float((pred == label).mean() * 100), 2),
                    "agreement_with_torch_fp32": round(float((pred == ref).mean() * 100), 2)}
    return out


# ---------------------------------------------------------------- one model


@dataclass(frozen=True)
class Settings:
    runs: int = 100
    rounds: int = 5
    warmup: int = 10
    threads: int = 1
    calib: int = 128
    eval_images: int = 500
    data: str | None = None
    keep: Path | None = None

    @property
    def runs64(self) -> int:
        return max(self.runs // 10, self.rounds)


def ratios(stats: dict[str, dict[str, LatencyStats]], rounds: dict[str, dict[str, list[list[float]]]]) -> dict:
    """Speed-ups: every engine vs PyTorch eager FP32; edgeres INT8 (ORT and OpenVINO) vs the INT8 peers.

    Against the peers each batch also gets the per-round ratio with its 95% bootstrap interval and a
    verdict: "faster" or "slower" when the interval excludes 1, else "parity".
    """
    from edgeres.bench import speed_ratio

    b1, b64 = stats["batch1"], stats["batch64"]

    def vs(a: str, b: str) -> dict | None:  # how many times faster a is than b
        if a not in b1 or b not in b1:
            return None
        return {"batch1_latency": round(b1[b].p50_ms / b1[a].p50_ms, 3),
                "batch64_throughput": round(b64[a].throughput_ips / b64[b].throughput_ips, 3)}

    out = {"vs_torch_fp32": {k: vs(k, "torch_fp32") for k in b1}}
    for ours in ("edgeres_int8", "edgeres_int8_openvino"):
        for peer in ("ort_qs_int8", "openvino_int8"):
            if (r := vs(ours, peer)) is not None:
                for batch, t in rounds.items():
                    per_round = speed_ratio(t[peer], t[ours])
                    lo, hi = per_round["ci95"]
                    r[f"{batch}_per_round"] = {**per_round,
                                               "verdict": "faster" if lo > 1 else "slower" if hi < 1 else "parity"}
                out[f"{ours}_vs_{peer}"] = r
    return out


def targets(rat: dict, key: str = "edgeres_int8") -> dict:
    """The issue's targets: >= 4x PyTorch eager FP32 at batch 1, and no slower than ORT quantize_static.

    "No slower" fails only where the per-round interval lies wholly below 1 at batch 1 or batch 64.
    """
    eager = rat["vs_torch_fp32"].get(key)
    peer = rat.get(f"{key}_vs_ort_qs_int8")
    verdicts = {b: peer[f"{b}_per_round"]["verdict"] for b in ("batch1", "batch64")} if peer else {}
    return {
        "batch1_4x_torch_fp32": bool(eager and eager["batch1_latency"] >= 4.0),
        "not_slower_than_ort_quantize_static": bool(verdicts) and "slower" not in verdicts.values(),
        "vs_ort_quantize_static": verdicts,
    }


def bench_model(name: str, s: Settings, weights: str | None = None) -> dict:
    """Build every engine for `name`, check top-1 agreement, time batch 1 and batch 64; return a JSON-able dict."""
    from edgeres.compress.fold_bn import find_conv_bn_pairs

    model, weights_note = fp32_model(name, weights)
    size = model.cfg.input_size
    calib, calib_note = calibration_set(model, s.calib, s.data)
    _, unfoldable = find_conv_bn_pairs(model, torch.zeros(1, 3, size, size))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if s.keep:
            work = s.keep / name
            work.mkdir(parents=True, exist_ok=True)
        info(f"{name}: building engines ({calib_note})")
        engines = [torch_engine(model)]
        ort_fp32, fp32_onnx = ort_fp32_engine(model, work, s.threads)
        engines += [ort_fp32, edgeres_int8_engine(model, calib, work, s.threads)]
        engines.append(ort_quantize_static_engine(fp32_onnx, calib, work, s.threads))
        notes = []
        try:
            engines.append(openvino_int8_engine(fp32_onnx, calib, size, s.threads))
            engines.append(edgeres_on_openvino_engine(work / "edgeres_int8_openvino.onnx", size, s.threads))
        except ImportError as exc:
            notes.append(f"OpenVINO engines skipped: {exc}; pip install 'edgeres[openvino]'")
        accuracy = {}
        test = load_split("test", s.eval_images, s.data) if s.eval_images else None
        if test is not None:
            info(f"{name}: top-1 on {len(test)} test images")
            accuracy = top1(engines, test, model.cfg.mean, model.cfg.std)
        runners = {e.key: e.run for e in engines}
        stats, rounds = {}, {}
        for batch, runs, warmup in zip(BATCHES, (s.runs, s.runs64), (s.warmup, max(s.warmup // 4, 1)), strict=True):
            info(f"{name}: timing batch {batch} ({runs} runs per engine, {s.rounds} interleaved rounds)")
            rounds[f"batch{batch}"] = interleaved_rounds(runners, batch, size, runs=runs, warmup=warmup,
                                                         rounds=s.rounds)
            stats[f"batch{batch}"] = pooled(batch, rounds[f"batch{batch}"])
    rat = ratios(stats, rounds)
    return {
        "model": name,
        "weights": weights_note,
        "calibration": calib_note,
        "unfoldable_bns": len(unfoldable),
        "engines": [
            {"key": e.key, "label": e.label, "precision": e.precision, "build_s": round(e.build_s, 2),
             "size_mb": e.size_mb, "details": e.details, "accuracy": accuracy.get(e.key),
             **{b: asdict(stats[b][e.key]) for b in stats}}
            for e in engines
        ],
        "ratios": rat,
        "targets": {"edgeres_int8": targets(rat)},
        "notes": notes,
    }


# ---------------------------------------------------------------- report






def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    for m in result["models"]:
        table = Table(title=f"{m['model']} ({m['weights']}; calibration: {m['calibration']})", title_justify="left")
        for col in ("engine", "b1 p50 ms", "b1 vs eager", "b64 img/s", "b64 vs eager", "top-1 %", "agree %",
                    "MB"):
            table.add_column(col, justify="left" if col == "engine" else "right")
        for e in m["engines"]:
            r = m["ratios"]["vs_torch_fp32"][e["key"]]
            acc = e["accuracy"] or {}
            table.add_row(e["label"], f"{e['batch1']['p50_ms']:.3f}", _x(r["batch1_latency"]),
                          f"{e['batch64']['throughput_ips']:.0f}", _x(r["batch64_throughput"]),
                          str(acc.get("top1_accuracy", "-")), str(acc.get("agreement_with_torch_fp32", "-")),
                          "-" if e["size_mb"] is None else f"{e['size_mb']:.2f}")
        console.print(table)
        for key, r in m["ratios"].items():
            if key != "vs_torch_fp32":
                ours, peer = key.split("_vs_")
                per = [r[f"batch{b}_per_round"] for b in BATCHES]
                console.print(f"  {ours} vs {peer} (>1: {ours} faster; per-round median [95% CI]): "
                              + ", ".join(f"batch {b} {p['median']:.3f}x [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] "
                                          f"{p['verdict']}" for b, p in zip(BATCHES, per, strict=True)))
        for key, t in m["targets"].items():
            marks = ", ".join(f"{k} {'[green]met[/]' if v else '[red]missed[/]'}" for k, v in t.items()
                              if isinstance(v, bool))
            console.print(f"  targets for {key}: {marks}")
        for note in m["notes"]:
            console.print(f"  [yellow]{note}[/]")
    for note in result["notes"]:
        console.print(f"[yellow]{note}[/]")


def run(models: list[str], s: Settings, weights: dict[str, str] | None = None) -> dict:
    """Benchmark every model; the whole result as a JSON-able dict."""
    torch.set_num_threads(s.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = [bench_model(name, s, (weights or {}).get(name)) for name in models]
    load_after = os.getloadavg()
    notes = ["OpenVINO runs with INFERENCE_PRECISION_HINT=f32: its INT8 layers run u8/i8 and the rest FP32 "
             "(on AMX/AVX512-BF16 CPUs its default would run the non-INT8 parts in bf16)."]
    busy = max(load_before[0], load_after[0]) > machine()["cores_available"]
    if busy:
        notes.append(f"machine busy (1-min load {load_before[0]:.1f} -> {load_after[0]:.1f} on "
                     f"{machine()['cores_available']} cores): absolute figures are noisy; ratios less so")
    return {
        "format": "edgeres-bench-cpu-int8/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": load_after},
        "versions": versions(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
                     "runs_batch64": s.runs64, "batches": list(BATCHES)},
        "wall_s": round(time.perf_counter() - t0, 1),
        "models": results,
        "notes": notes,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per engine (batch 64: runs/10)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the runs are split into")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per engine before timing")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--calib", type=int, default=128, help="calibration images")
    p.add_argument("--eval", type=int, default=500, help="test images for the top-1 check (0: skip)")
    p.add_argument("--data", default=None, help="folder holding cifar-10-batches-py/ (default: $EDGERES_DATA)")
    p.add_argument("--weights", action="append", default=[], metavar="MODEL=PATH", help="checkpoint for a model")
    p.add_argument("--keep", type=Path, default=None, help="keep the ONNX files under this folder")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from edgeres.errors import EdgeresError
    from edgeres.io import atomic_write

    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    weights = dict(w.split("=", 1) for w in args.weights if "=" in w)
    if args.runs < 1 or args.rounds < 1 or args.warmup < 0:
        print("error: need --runs >= 1, --rounds >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    settings = Settings(runs=args.runs, rounds=args.rounds, warmup=args.warmup,
                        threads=args.threads or len(os.sched_getaffinity(0)), calib=args.calib,
                        eval_images=args.eval, data=args.data, keep=args.keep)
    try:
        result = run(models, settings, weights)
    except EdgeresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    render(result)
    if args.json:
        import json

        with atomic_write(args.json) as f:
            f.write_text(json.dumps(result, indent=2))
        info(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
