#!/usr/bin/env python3
"""Run an edgeres Jetson bundle's TensorRT engine with only what JetPack provides.

Needs TensorRT's Python bindings and numpy (Pillow to classify image files); never edgeres. CUDA
memory comes from JetPack's CUDA runtime (libcudart) through ctypes. Everything about the model is
read from the bundle's own `artifact.json`: class names, input name and shape, preprocessing.

    python3 trt_run.py --info                     what the bundle says about itself (no GPU needed)
    python3 trt_run.py --self-check               the engine against golden.npz: exit 1 if it disagrees
    python3 trt_run.py IMAGE [IMAGE ...]          top-5 class names with probabilities
    python3 trt_run.py --bench [--batch 1]        engine latency (GPU compute; copies excluded)

Build the engine first with ./build.sh. edgeres copies this file verbatim into every Jetson bundle;
its tests hold the preprocessing below pixel for pixel against edgeres's own. It runs on every JetPack's
own Python (3.6 on JetPack 4.6, 3.8 on 5, 3.10 on 6) with the numpy and Pillow of its Ubuntu, hence
typing's Optional/List and no newer syntax.
"""

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.10.2",
                "/usr/local/cuda/lib64/libcudart.so", "/usr/local/cuda/targets/aarch64-linux/lib/libcudart.so")
H2D, D2H = 1, 2  # cudaMemcpyKind


class RunError(Exception):
    """A problem the user can fix; printed as one `error:` line, exit 1."""


# --- bundle metadata -------------------------------------------------------------------------------------


def read_meta(bundle: Path) -> dict:
    path = bundle / "artifact.json"
    if not path.is_file():
        raise RunError(f"{path} not found; run this inside the bundle edgeres exported (or pass --bundle DIR)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not str(meta.get("format", "")).startswith("edgeres-artifact/"):
        raise RunError(f"{path} is not an edgeres artifact record")
    return meta


def class_names(meta: dict) -> list[str]:
    return meta["classes"] or [f"class {i}" for i in range(meta["num_classes"])]


# --- preprocessing: the record in artifact.json, step by step ------------------------------------------------


def load_rgb(path: str | Path):
    """Decode any image to RGB: EXIF orientation applied, transparency and 16-bit grey handled."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")
        return im.convert("RGB")


def preprocess(path: str | Path, pre: dict) -> np.ndarray:
    """Resize the shorter side, centre-crop, scale, normalise: float32 CHW."""
    from PIL import Image

    if pre["color"] != "RGB" or pre["layout"] != "NCHW" or not pre["antialias"]:
        raise RunError(f"unsupported preprocessing {pre}")
    modes = getattr(Image, "Resampling", Image)  # Pillow < 9.1 (JetPack's python3-pil) has no Resampling
    filters = {"nearest": modes.NEAREST, "bilinear": modes.BILINEAR, "bicubic": modes.BICUBIC,
               "lanczos": modes.LANCZOS}
    img = load_rgb(path)
    w, h = img.size
    shorter = pre["resize_shorter_side"]
    size = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)  # truncate the longer
    if size != (w, h):
        img = img.resize(size, filters[pre["interpolation"]])  # Pillow antialiases when it shrinks
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


# --- CUDA memory through JetPack's libcudart ----------------------------------------------------------------


class CudaRuntime:
    """Device buffers, copies and a stream through the CUDA runtime library (no pycuda needed)."""

    def __init__(self) -> None:
        self.lib = None
        for name in CUDART_NAMES:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            raise RunError("the CUDA runtime (libcudart.so) was not found; run this on the device with JetPack")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RunError(f"{what} failed: CUDA error {err} ({self.lib.cudaGetErrorString(err).decode()})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def htod(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._check(self.lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, H2D), "cudaMemcpy to device")

    def dtoh(self, array: np.ndarray, ptr: int) -> None:
        self._check(self.lib.cudaMemcpy(array.ctypes.data, ptr, array.nbytes, D2H), "cudaMemcpy to host")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


# --- the engine ----------------------------------------------------------------------------------------------


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise RunError("TensorRT's Python bindings were not found (JetPack ships them: python3-libnvinfer); "
                       "run this on the device") from exc
    return tensorrt


class Engine:
    """A deserialized engine with one input and one output; `run` takes and returns host arrays."""

    def __init__(self, path: Path, cuda: CudaRuntime) -> None:
        trt = import_tensorrt()
        if not path.is_file():
            raise RunError(f"{path} not found; build it first: ./build.sh")
        self.trt, self.cuda = trt, cuda
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RunError(f"TensorRT {trt.__version__} cannot load {path.name} (built by another TensorRT or for "
                           "another GPU?); rebuild it here with ./build.sh")
        self.context = self.engine.create_execution_context()
        self.legacy = not hasattr(self.engine, "num_io_tensors")  # TensorRT < 8.5: binding indices
        if self.legacy:
            names = [self.engine.get_binding_name(i) for i in range(self.engine.num_bindings)]
            is_input = [self.engine.binding_is_input(i) for i in range(self.engine.num_bindings)]
        else:
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        inputs = [n for n, i in zip(names, is_input) if i]
        outputs = [n for n, i in zip(names, is_input) if not i]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RunError(f"{path.name} has inputs {inputs} and outputs {outputs}; expected one of each")
        self.input, self.output = inputs[0], outputs[0]
        self.names = names
        self.stream = cuda.stream()
        self._buffers = {}  # name -> (device pointer, bytes)  # name -> (pointer, bytes)

    def _dtype(self, name: str):
        dt = (self.engine.get_binding_dtype(self.names.index(name)) if self.legacy
              else self.engine.get_tensor_dtype(name))
        return np.dtype(self.trt.nptype(dt))

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Set the input shape, copy `x` to the device, bind the buffers; returns the empty host output."""
        x = np.ascontiguousarray(x, dtype=self._dtype(self.input))
        if self.legacy:
            i, o = self.names.index(self.input), self.names.index(self.output)
            self.context.set_binding_shape(i, x.shape)
            out_shape = tuple(self.context.get_binding_shape(o))
        elif self.context.set_input_shape(self.input, x.shape) is False:
            raise RunError(f"the engine does not take input shape {x.shape}; rebuild it for this batch size")
        else:
            out_shape = tuple(self.context.get_tensor_shape(self.output))
        out = np.empty(out_shape, dtype=self._dtype(self.output))
        x_ptr, y_ptr = self._buffer(self.input, x.nbytes), self._buffer(self.output, out.nbytes)
        self.cuda.htod(x_ptr, x)
        if self.legacy:
            self._bindings = [x_ptr if n == self.input else y_ptr for n in self.names]
        else:
            self.context.set_tensor_address(self.input, x_ptr)
            self.context.set_tensor_address(self.output, y_ptr)
        return out

    def execute(self) -> None:
        """Run the bound buffers once and wait for the GPU."""
        if self.legacy:
            if not self.context.execute_v2(self._bindings):
                raise RunError("TensorRT execution failed")
            return
        if not self.context.execute_async_v3(self.stream):
            raise RunError("TensorRT execution failed")
        self.cuda.synchronize(self.stream)

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.prepare(x)
        self.execute()
        self.cuda.dtoh(out, self._buffers[self.output][0])
        return out.astype(np.float32)


# --- commands ------------------------------------------------------------------------------------------------


def info(bundle: Path, meta: dict) -> dict:
    engine_json = bundle / "model.engine.json"
    try:
        trt_version = import_tensorrt().__version__
    except RunError:
        trt_version = None
    pre = meta["preprocess"]
    return {"model": meta["model"], "precision": meta["precision"], "target": meta.get("target"),
            "classes": len(class_names(meta)), "first_classes": class_names(meta)[:5], "input": meta["input"],
            "preprocess": (f"resize shorter side {pre['resize_shorter_side']} ({pre['interpolation']}), centre-crop "
                           f"{pre['center_crop']}, /255, mean {pre['mean']}, std {pre['std']}"),
            "weights": meta.get("weights"), "edgeres_version": meta.get("edgeres_version"),
            "tensorrt_here": trt_version,
            "engine_build": json.loads(engine_json.read_text()) if engine_json.is_file() else None}


def self_check(engine: Engine, bundle: Path, meta: dict, max_diff: float | None = None) -> dict:
    """Run golden.npz's inputs one by one; compare with the logits ONNX Runtime gave for this exact ONNX."""
    spec = meta.get("self_check") or {}
    path = bundle / spec.get("file", "golden.npz")
    if not path.is_file():
        raise RunError(f"{path} not found; the bundle is incomplete, export it again")
    golden = np.load(str(path))
    inputs, expected = golden["inputs"], golden["logits"]
    golden.close()
    got = np.concatenate([engine.run(x[None]) for x in inputs]).reshape(expected.shape)
    tolerance = float(max_diff if max_diff is not None else spec["max_abs_logit_diff"])
    agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
    diff = float(np.abs(got - expected).max())
    need = float(spec.get("min_top1_agreement", 1.0))
    return {"images": int(len(inputs)), "top1_agreement": agreement, "min_top1_agreement": need,
            "max_abs_logit_diff": diff, "tolerance": tolerance, "finite": bool(np.isfinite(got).all()),
            "passed": bool(np.isfinite(got).all() and agreement >= need and diff <= tolerance)}


def classify(engine: Engine, meta: dict, images: list[str], top: int) -> list[dict]:
    names = class_names(meta)
    results = []
    for path in images:
        try:
            x = preprocess(path, meta["preprocess"])[None]
        except OSError as exc:
            raise RunError(f"cannot decode image {path}: {exc}") from exc
        probs = softmax(engine.run(x)[0])
        if probs.size != len(names):
            raise RunError(f"the engine gives {probs.size} outputs, artifact.json names {len(names)} classes; "
                           "rebuild the engine from this bundle's model.onnx")
        order = np.argsort(-probs, kind="mergesort")[:top]  # stable: ties keep index order
        results.append({"image": path, "top": [{"index": int(i), "class": names[i], "probability": float(probs[i])}
                                               for i in order]})
    return results


def bench(engine: Engine, meta: dict, batch: int, warmup: int, runs: int) -> dict:
    """Latency of engine execution alone (inputs already on the GPU), after warm-up."""
    shape = [batch, *meta["input"]["shape"][1:]]
    engine.prepare(np.random.RandomState(0).standard_normal(shape).astype(np.float32))
    for _ in range(warmup):
        engine.execute()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        engine.execute()
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"batch": batch, "runs": runs, "p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "mean_ms": round(float(ms.mean()), 4), "throughput_ips": round(batch / float(np.median(times)), 2),
            "measures": "engine execution on the GPU; host<->device copies excluded"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run this bundle's TensorRT engine (tensorrt + numpy only).")
    parser.add_argument("images", nargs="*", help="image files to classify")
    parser.add_argument("--bundle", type=Path, default=HERE, help="bundle folder (default: this file's)")
    parser.add_argument("--engine", type=Path, help="engine file (default: BUNDLE/model.engine)")
    parser.add_argument("--info", action="store_true", help="print what the bundle says about itself")
    parser.add_argument("--self-check", action="store_true", help="compare the engine with golden.npz")
    parser.add_argument("--max-diff", type=float, help="self-check: largest logit difference allowed")
    parser.add_argument("--bench", action="store_true", help="time the engine")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if not (args.info or args.self_check or args.bench or args.images):
        parser.error("nothing to do: pass IMAGE files, --self-check, --bench or --info")
    out: dict = {}
    try:
        meta = read_meta(args.bundle)
        if args.info:
            out["info"] = info(args.bundle, meta)
        if args.self_check or args.bench or args.images:
            engine = Engine(args.engine or args.bundle / "model.engine", CudaRuntime())
            if args.self_check:
                out["self_check"] = self_check(engine, args.bundle, meta, args.max_diff)
            if args.images:
                out["predictions"] = classify(engine, meta, args.images, args.top)
            if args.bench:
                out["bench"] = bench(engine, meta, args.batch, args.warmup, args.runs)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_text(out)
    if "self_check" in out and not out["self_check"]["passed"]:
        return 1
    return 0


def _print_text(out: dict) -> None:
    for key, value in out.get("info", {}).items():
        print(f"{key}: {value}")
    if "self_check" in out:
        c = out["self_check"]
        verdict = "passed" if c["passed"] else "FAILED"
        print(f"self-check {verdict}: top-1 agreement {c['top1_agreement']:.3f} (need {c['min_top1_agreement']}), "
              f"max logit difference {c['max_abs_logit_diff']:.4g} (allowed {c['tolerance']:.4g}) "
              f"on {c['images']} golden inputs")
    for r in out.get("predictions", []):
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['probability']:.4f}  {t['class']} ({t['index']})")
    if "bench" in out:
        b = out["bench"]
        print(f"batch {b['batch']}: p50 {b['p50_ms']} ms, p90 {b['p90_ms']} ms, p99 {b['p99_ms']} ms, "
              f"{b['throughput_ips']} images/s ({b['measures']})")


if __name__ == "__main__":
    sys.exit(main())
