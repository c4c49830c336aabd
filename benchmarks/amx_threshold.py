"""Which convs should take ORT's AMX kernels: edgeres INT8 with backends.ort.amx_conv_weights under several thresholds.

    python benchmarks/amx_threshold.py [--model resnet20] [--threads 2] [--runs 600] [--json OUT]

Builds the pipeline's CPU INT8 file once (calibration/default.toml's images), then applies the AMX weight
rewrite with each (min_k, min_out) rule and times, interleaved in one process: ORT quantize_static INT8 (the
reference), edgeres INT8 without the rewrite, and each rule. Batch-1 p50 and batch-64 throughput, with the
ratio to quantize_static. Only meaningful on a CPU with AMX (amx_int8 in /proc/cpuinfo) and a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

RULES = ((256, 64), (256, 128), (1024, 128))  # (min_k, min_out); edgeres.backends.ort.AMX_MIN_* is the default


def main(argv: list[str] | None = None) -> int:
    import onnx
    import torch
    from _common import (
        _ort_session,
        calibration_set,
        fp32_model,
        interleaved,
        ort_fp32_engine,
        ort_quantize_static_engine,
        write_int8_onnx,
    )

    from edgeres.backends.ort import AMX_MIN_K, AMX_MIN_OUT, amx_conv_weights
    from edgeres.compress.quantize import ptq
    from edgeres.export import save_onnx
    from edgeres.hostcpu import has_amx_int8

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--runs", type=int, default=600, help="timed batch-1 runs per variant (batch 64: runs/10)")
    p.add_argument("--calib", type=int, default=128, help="calibration images")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model, weights = fp32_model(args.model)
    size = model.cfg.input_size
    calib, _ = calibration_set(model, args.calib)
    result: dict = {"model": model.cfg.name, "weights": weights, "threads": threads, "host_amx_int8": has_amx_int8(),
                    "default_rule": [AMX_MIN_K, AMX_MIN_OUT], "convs_rewritten": {}, "timing": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, fp32 = ort_fp32_engine(model, tmp, threads)
        runners = {"quantize_static": ort_quantize_static_engine(fp32, calib, tmp, threads).run}
        base, _ = write_int8_onnx(ptq(model, calib, example_input=torch.zeros(1, 3, size, size)), tmp / "e.onnx", size)
        paths = {"edgeres, no AMX rewrite": base}
        for min_k, min_out in RULES:
            rewritten, n = amx_conv_weights(onnx.load(str(base)), min_k=min_k, min_out=min_out)
            key = f"edgeres, AMX K>={min_k} N>={min_out}"
            result["convs_rewritten"][key] = n
            if n:
                paths[key] = save_onnx(rewritten, tmp / f"amx_{min_k}_{min_out}.onnx")
        for key, path in paths.items():
            session = _ort_session(path, threads)
            runners[key] = (lambda s: lambda a: s.run(None, {"input": a})[0])(session)
        for batch, runs in ((1, args.runs), (64, max(args.runs // 10, 10))):
            stats = interleaved(runners, batch, size, runs=runs, warmup=10, rounds=10)
            ref = stats["quantize_static"]
            result["timing"][f"batch{batch}"] = {
                k: {"p50_ms": round(v.p50_ms, 4), "throughput_ips": round(v.throughput_ips, 1),
                    "vs_quantize_static": round(ref.p50_ms / v.p50_ms, 3)} for k, v in stats.items()}
    print(f"{result['model']}: {threads} threads, AMX {'yes' if result['host_amx_int8'] else 'no'}")
    print(f"{'variant':32s} {'convs':>5s} {'b1 p50 ms':>10s} {'x qs':>6s} {'b64 img/s':>10s} {'x qs':>6s}")
    b1, b64 = result["timing"]["batch1"], result["timing"]["batch64"]
    for k in b1:
        n = result["convs_rewritten"].get(k, "")
        print(f"{k:32s} {n!s:>5s} {b1[k]['p50_ms']:10.4f} {b1[k]['vs_quantize_static']:6.3f} "
              f"{b64[k]['throughput_ips']:10.1f} {b64[k]['vs_quantize_static']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
