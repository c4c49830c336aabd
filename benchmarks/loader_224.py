"""ImageFolder streaming at 224 px: images/s and peak memory (this process plus its DataLoader workers).

    python benchmarks/loader_224.py FOLDER [FOLDER ...] [--workers N] [--batch 64] [--split test] [--json OUT]

Each FOLDER is an ImageFolder tree read through the ImageNet evaluation record (decode to RGB, shorter side
to 256 bilinear antialiased, centre crop 224, normalise). Peak memory is the largest sum of resident set
sizes of the process tree, sampled every 20 ms; it should not grow with the number of images, since only
file names are held. Run two trees of different sizes (e.g. the 200-image sample and the same files
repeated ten times through symlinks) to see it.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import psutil

from edgeres import data
from edgeres.preprocess import Preprocess


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def measure(folder: str, *, workers: int, batch: int, split: str) -> dict:
    pp = Preprocess.imagenet(224, resize=256)
    ds = data.load_dataset(folder, split, preprocess=pp, workers=workers)
    proc = psutil.Process(os.getpid())
    base = _tree_rss(proc)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    seen = 0
    for x, _ in data.batches(ds, batch, mean=pp.mean, std=pp.std):
        seen += len(x)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return {"folder": folder, "images": seen, "workers": workers, "batch": batch, "seconds": round(seconds, 3),
            "images_per_s": round(seen / seconds, 1), "rss_before_mb": round(base / 2**20, 1),
            "peak_tree_rss_mb": round(peak[0] / 2**20, 1), "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [measure(f, workers=args.workers, batch=args.batch, split=args.split) for f in args.folders]
    for r in rows:
        print(f"{r['folder']}: {r['images']} images in {r['seconds']} s = {r['images_per_s']} images/s "
              f"({r['workers']} workers, {r['cpus']} CPUs); peak RSS {r['peak_tree_rss_mb']} MB "
              f"(before {r['rss_before_mb']} MB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
