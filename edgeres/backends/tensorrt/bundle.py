"""The device half of a Jetson bundle: build.sh, calibration cache, build settings and README.

build.sh finds the TensorRT on the device at run time and picks the trtexec flags for it. Every
branch is rendered from `plan.trtexec_command`, the one source of truth for flags.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeres import artifact_meta
from edgeres.artifact_meta import ArtifactMeta
from edgeres.backends.tensorrt import plan, qdq
from edgeres.errors import ExportError, TargetError
from edgeres.io import atomic_write
from edgeres.targets import Target, parse_version

RUNNER = "trt_run.py"                    # stand-alone runner (edgeres/backends/tensorrt/trt_run.py, copied verbatim)
GOLDEN = "golden.npz"                    # inputs + ONNX Runtime logits for the runner's --self-check
ONNX_NAME = "model.onnx"
GOLDEN_IMAGES = 8
# Largest logit difference the device may show, times the largest golden logit: INT8 engines requantize
# differently from ONNX Runtime; FP16 rounds; FP32 builds use TF32 on Ampere and later by default.
GOLDEN_TOLERANCE = {"int8": 0.1, "fp16": 0.02, "fp32": 0.01}
CALIBRATION_CACHE = "calibration.cache"
DEVICE_CACHE = "calibration.trt.cache"   # calibration.cache with the header of the device's TensorRT
TRTEXEC = "__TRTEXEC__"                  # stands for "$TRTEXEC" in rendered command lines


@dataclass(frozen=True)
class VersionBranch:
    """TensorRT versions that share one set of trtexec flags, and a version that stands for them."""

    label: str
    condition: str          # bash test on $TRT_MAJOR / $TRT_MINOR ("" for the last branch: else)
    example: tuple[int, ...]


BRANCHES = (
    VersionBranch("TensorRT 8.x: weakly typed, --workspace", '[ "$TRT_MAJOR" -lt 10 ]', (8, 5, 2)),
    VersionBranch("TensorRT 10.0-10.7: weakly typed, last with DLA", '[ "$TRT_MAJOR" -eq 10 ] && '
                  '[ "$TRT_MINOR" -le 7 ]', (10, 3, 0)),
    VersionBranch("TensorRT 10.8-10.11: weakly typed, no DLA", '[ "$TRT_MAJOR" -eq 10 ] && '
                  '[ "$TRT_MINOR" -le 11 ]', (10, 8, 0)),
    VersionBranch("TensorRT 10.12-10.x: Q/DQ builds strongly typed", '[ "$TRT_MAJOR" -eq 10 ]', (10, 13, 3)),
    VersionBranch("TensorRT 11+: always strongly typed", "", (11, 4, 1)),
)


def noqdq_name(onnx_name: str) -> str:
    """`model.onnx` -> `model.noqdq.onnx`, the Q/DQ-free ONNX the DLA builds read."""
    return f"{Path(onnx_name).stem}.noqdq.onnx"


@dataclass(frozen=True)
class Golden:
    """Inputs with the logits ONNX Runtime gives for the bundle's ONNX, and what the device must match."""

    inputs: np.ndarray
    logits: np.ndarray
    max_abs_logit_diff: float
    min_top1_agreement: float

    def self_check(self) -> dict:
        return {"file": GOLDEN, "images": int(len(self.inputs)), "reference": "onnxruntime on " + ONNX_NAME,
                "max_abs_logit_diff": self.max_abs_logit_diff, "min_top1_agreement": self.min_top1_agreement}


def golden_set(onnx_path: str | os.PathLike, candidates: np.ndarray, n: int = GOLDEN_IMAGES,
               precision: str = "int8") -> Golden:
    """The `n` candidates whose top-1 this exact ONNX (through ONNX Runtime) decides most clearly, with its logits.

    Clear margins keep the device's top-1 check meaningful: an engine within tolerance cannot flip them.
    """
    from edgeres.backends.base import open_artifact
    from edgeres.backends.ort import OrtBackend

    backend = OrtBackend()
    session = backend.load(open_artifact(onnx_path))
    logits = np.concatenate([backend.run(session, x[None]) for x in candidates]).astype(np.float32)
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    pick = np.sort(np.argsort(-margin, kind="stable")[:n])
    logits = logits[pick]
    tolerance = GOLDEN_TOLERANCE[precision] * float(np.abs(logits).max())
    robust = float(np.mean(margin[pick] > 2 * tolerance))
    return Golden(np.ascontiguousarray(candidates[pick], dtype=np.float32), logits, round(tolerance, 6),
                  robust)


def write_device_runner(bundle_dir: str | os.PathLike, meta: ArtifactMeta, golden: Golden) -> list[Path]:
    """artifact.json (the record + self-check limits), golden.npz and the stand-alone trt_run.py."""
    bundle = Path(bundle_dir)
    with atomic_write(bundle / GOLDEN) as tmp, open(tmp, "wb") as f:
        np.savez(f, inputs=golden.inputs, logits=golden.logits)
    sidecar = artifact_meta.write_sidecar(bundle, meta, {"self_check": golden.self_check()})
    with atomic_write(bundle / RUNNER) as tmp:
        tmp.write_text((Path(__file__).parent / RUNNER).read_text(encoding="utf-8"), encoding="utf-8")
        tmp.chmod(0o755)
    return [bundle / GOLDEN, sidecar, bundle / RUNNER]


def write_bundle_extras(
    bundle_dir: str | os.PathLike,
    target: Target,
    *,
    onnx_name: str,
    precision: str,
    input_shape: Sequence[int],
    calib_scales: dict[str, float] | None = None,
    workspace_mb: int | None = None,
    meta: ArtifactMeta | None = None,
    golden: Golden | None = None,
) -> list[Path]:
    """Write build.sh, build.json, README.md and, for DLA INT8, the Q/DQ-free ONNX and calibration.cache.

    `calib_scales` (tensor -> amax/127, Q/DQ-free names) defaults to the scales read from the Q/DQ ONNX.
    With `meta` and `golden`, also the stand-alone runner (`write_device_runner`). Returns the paths written.
    """
    bundle = Path(bundle_dir)
    if target.runtime != "tensorrt":
        raise TargetError(f"target {target.name} runs {target.runtime}; device bundles are for TensorRT")
    target.require(precision)
    onnx_path = bundle / onnx_name
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} not found; write the ONNX into the bundle before its build files")
    shape = _full_shape(input_shape, target.default_batch)
    shapes = _shapes_flag(onnx_path, shape)
    written = write_device_runner(bundle, meta, golden) if meta is not None and golden is not None else []

    dla = target.has_dla and precision in ("int8", "fp16")
    cache = None
    if dla:
        from edgeres.onnxgraph import load

        model = load(onnx_path)
        with atomic_write(bundle / noqdq_name(onnx_name)) as tmp:
            tmp.write_bytes(qdq.strip_qdq(model).SerializeToString())
        written.append(bundle / noqdq_name(onnx_name))
        if precision == "int8":
            scales = calib_scales if calib_scales is not None else qdq.scales_from_qdq_onnx(model)
            if not scales:
                raise ExportError(f"{onnx_name} has no activation Q/DQ to make a DLA calibration cache "
                                  "from; export it with --int8")
            cache = bundle / CALIBRATION_CACHE
            written.append(qdq.write_calibration_cache(cache, scales, _cache_version(target)))

    settings = plan.BuildSettings(
        target=target.name, precision=precision, onnx=onnx_name, input_shape=tuple(shape),
        onnx_noqdq=noqdq_name(onnx_name) if dla else None,
        calibration_cache=CALIBRATION_CACHE if cache else None,
        workspace_mb=plan.workspace_cap_mb(target, workspace_mb),
    )
    written.append(settings.write(bundle))
    files = {
        "build.sh": build_script(target, onnx_name=onnx_name, precision=precision, dla=dla,
                                 has_cache=cache is not None, workspace_mb=workspace_mb, shapes=shapes),
        "README.md": device_readme(target, onnx_name=onnx_name, precision=precision, shape=shape, dla=dla,
                                   runner=any(p.name == RUNNER for p in written), meta=meta),
    }
    for name, text in files.items():
        with atomic_write(bundle / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
            if name == "build.sh":
                tmp.chmod(0o755)
        written.append(bundle / name)
    return written


def _full_shape(input_shape: Sequence[int], batch: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (batch, *shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise ExportError(f"input shape must be (C, H, W) or (N, C, H, W), positive; got {input_shape}")
    return shape


def _shapes_flag(onnx_path: Path, shape: tuple[int, ...]) -> str | None:
    """`--shapes` value when the ONNX input has a dynamic batch (trtexec needs the shape to build)."""
    from edgeres.onnxgraph import load

    inp = load(onnx_path).graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return None
    return f"{inp.name}:{'x'.join(map(str, shape))}"


def _cache_version(target: Target) -> tuple[int, ...]:
    """Newest TensorRT of the target with a DLA path; build.sh rewrites the header on the device."""
    versions = [parse_version(v) for v in target.tensorrt.versions()] if target.tensorrt else []
    dla_ok = [v for v in versions if v[:2] <= plan.LAST_DLA]
    return max(dla_ok) if dla_ok else parse_version(target.tensorrt.min)


# --- build.sh ----------------------------------------------------------------------------------------


def _render(cmd: list[str]) -> str:
    return " ".join('"$TRTEXEC"' if a == TRTEXEC else shlex.quote(a) for a in cmd)


def _quote_reason(exc: TargetError, branch: VersionBranch) -> str:
    """The error, quoted for bash, with the branch's stand-in version replaced by the device's."""
    shown = ".".join(map(str, branch.example))
    return shlex.quote(str(exc).replace(f"TensorRT {shown} ", "this TensorRT "))


def _branch_lines(target: Target, branch: VersionBranch, *, onnx_name: str, precision: str, dla: bool,
                  has_cache: bool, workspace_mb: int | None, shapes: str | None) -> list[str]:
    common = {"precision": precision, "workspace_mb": workspace_mb, "shapes": shapes, "trtexec": TRTEXEC}
    try:
        gpu = plan.trtexec_command(onnx_name, plan.ENGINE_NAME, target, branch.example,
                                          **common)
    except TargetError as exc:
        return [f'fail "TensorRT $TRT_VERSION: "{_quote_reason(exc, branch)}']
    lines = [f"build {_render(gpu)}"]
    if not dla:
        return lines
    cache = DEVICE_CACHE if has_cache else None
    for core in range(target.dla_cores):
        try:
            cmd = plan.trtexec_command(noqdq_name(onnx_name), plan.dla_engine_name(core), target,
                                              branch.example, dla_core=core, calib_cache=cache, **common)
        except TargetError as exc:
            lines.append(f'note "TensorRT $TRT_VERSION: no DLA engine: "{_quote_reason(exc, branch)}')
            break
        if core == 0 and has_cache:
            lines.append("retarget_cache")
        lines.append(f"build {_render(cmd)}")
    return lines


_SCRIPT_HEAD = r"""#!/usr/bin/env bash
# Build TensorRT engines for {target} on the device itself ({description}).
# Generated by edgeres: engines are specific to the GPU and the TensorRT version, so they are built here.
# The trtexec flags follow the TensorRT found on this machine:
#   EDGERES_TRT_VERSION=10.3.0 ./build.sh   overrides the detected version
#   TRTEXEC=/path/to/trtexec ./build.sh     picks the trtexec binary
set -euo pipefail
cd "$(dirname "$0")"

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"

detect_trt_version() {{
    local v=""
    if [ -n "${{EDGERES_TRT_VERSION:-}}" ]; then echo "$EDGERES_TRT_VERSION"; return; fi
    v="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
    if [ -z "$v" ]; then
        v="$(dpkg-query -W -f='${{Version}}' tensorrt 2>/dev/null || true)"   # e.g. 8.5.2.2-1+cuda11.4
    fi
    if [ -z "$v" ] && [ -x "$TRTEXEC" ]; then
        # trtexec prints "[TensorRT v8502]" (8.x) or "[TensorRT v100300]" (10.x and later).
        local n
        n="$("$TRTEXEC" --help 2>&1 | sed -n 's/.*TensorRT v\([0-9][0-9]*\).*/\1/p' | head -n 1)"
        if [ -n "$n" ] && [ "$n" -ge 100000 ]; then v="$((n / 10000)).$((n / 100 % 100)).$((n % 100))"
        elif [ -n "$n" ]; then v="$((n / 1000)).$((n / 100 % 10)).$((n % 100))"; fi
    fi
    echo "${{v%%[-+]*}}"
}}

fail() {{ echo "error: $1" >&2; exit 1; }}
note() {{ echo "note: $1" >&2; }}
build() {{ echo "+ $*" >&2; "$@"; }}
retarget_cache() {{
    # TensorRT skips a calibration cache whose header names another version.
    local n
    if [ "$TRT_MAJOR" -ge 10 ]; then n=$((TRT_MAJOR * 10000 + TRT_MINOR * 100 + TRT_PATCH))
    else n=$((TRT_MAJOR * 1000 + TRT_MINOR * 100 + TRT_PATCH)); fi
    {{ echo "TRT-$n-EntropyCalibration2"; tail -n +2 {cache}; }} > {device_cache}
}}

TRT_VERSION="$(detect_trt_version)"
[ -n "$TRT_VERSION" ] || fail "TensorRT not found: install JetPack's TensorRT or set EDGERES_TRT_VERSION"
IFS=. read -r TRT_MAJOR TRT_MINOR TRT_PATCH _ <<< "$TRT_VERSION.0.0"
case "$TRT_MAJOR$TRT_MINOR$TRT_PATCH" in *[!0-9]*) fail "cannot read TensorRT version '$TRT_VERSION'";; esac
echo "TensorRT $TRT_VERSION, target {target}, precision {precision}" >&2
if ! printf '%s\n' {known} | grep -qx "$TRT_MAJOR\.$TRT_MINOR"; then
    note "TensorRT $TRT_VERSION is not one {target} is known to ship ({known_text}); trying anyway"
fi
"""


def build_script(target: Target, *, onnx_name: str, precision: str, dla: bool = False,
                 has_cache: bool = False, workspace_mb: int | None = None, shapes: str | None = None) -> str:
    """The bash script that builds the bundle's engines with trtexec on the device."""
    known = target.tensorrt.versions() if target.tensorrt else ()
    known_mm = sorted({".".join(v.split(".")[:2]) for v in known} or {target.tensorrt.min})
    text = _SCRIPT_HEAD.format(
        target=target.name, description=target.description, precision=precision,
        cache=CALIBRATION_CACHE, device_cache=DEVICE_CACHE,
        known=" ".join(shlex.quote(v) for v in known_mm),
        known_text=", ".join(known) or f"{target.tensorrt.min}..{target.tensorrt.max}",
    )
    body = []
    for i, branch in enumerate(BRANCHES):
        if i == 0:
            body.append(f"if {branch.condition}; then   # {branch.label}")
        elif i < len(BRANCHES) - 1:
            body.append(f"elif {branch.condition}; then   # {branch.label}")
        else:
            body.append(f"else   # {branch.label}")
        lines = _branch_lines(target, branch, onnx_name=onnx_name, precision=precision, dla=dla,
                              has_cache=has_cache, workspace_mb=workspace_mb, shapes=shapes)
        body += [f"    {line}" for line in lines]
    body.append("fi")
    body.append(f'echo "done: {plan.ENGINE_NAME}{" and the DLA engines" if dla else ""}" >&2')
    return text + "\n".join(body) + "\n"


# --- README.md ---------------------------------------------------------------------------------------


def _runner_readme(meta: ArtifactMeta | None) -> str:
    what = ""
    if meta is not None:
        names = meta.classes[:3] if meta.classes else ()
        what = (f"\n`artifact.json` says what the model is: {meta.num_classes} classes"
                + (f" ({', '.join(names)}, ...)" if names else "")
                + f", input `{meta.input_name}` {meta.input_size}x{meta.input_size} RGB, and every preprocessing step."
                + " The same record is in `model.onnx` (metadata key `edgeres`).\n")
    return f"""
## 3. Check and run the engine without edgeres
`{RUNNER}` needs only TensorRT's Python bindings and numpy (Pillow for images), all in JetPack.
{what}
```
python3 {RUNNER} --self-check        # the engine against {GOLDEN}; exit 1 when it disagrees
python3 {RUNNER} cat.jpg dog.png     # top-5 class names with probabilities
python3 {RUNNER} --bench --batch 1   # engine latency (GPU execution; copies excluded)
python3 {RUNNER} --info              # what the bundle says about itself
```
`{GOLDEN}` holds {GOLDEN_IMAGES} inputs with the logits this exact ONNX gives in ONNX Runtime. The self-check
runs them through the engine and compares top-1 agreement and the largest logit difference with the limits
in `artifact.json` (`--max-diff` overrides): an INT8 Q/DQ graph that builds yet computes wrongly on this
TensorRT version or board fails here, before it ships.
"""


def device_readme(target: Target, *, onnx_name: str, precision: str, shape: tuple[int, ...],
                  dla: bool, runner: bool = False, meta: ArtifactMeta | None = None) -> str:
    t = target
    facts = [f"- Compute capability: {t.compute_capability}" if t.compute_capability else None,
             f"- Memory: {t.memory_mb} MB" if t.memory_mb else None,
             f"- DLA cores: {t.dla_cores}",
             f"- Peak INT8 (dense): {t.peak_int8_tops} TOPS" if t.peak_int8_tops else None,
             f"- Peak FP16: {t.peak_fp16_tflops} TFLOPS" if t.peak_fp16_tflops else None,
             f"- Memory bandwidth: {t.mem_bandwidth_gbs} GB/s" if t.mem_bandwidth_gbs else None]
    jetpack = "\n".join(f"| {r.jetpack} | {r.tensorrt} |" for r in (t.tensorrt.jetpack if t.tensorrt else ()))
    dla_text = (
        f"\nOn this board build.sh also builds `{plan.dla_engine_name(0)}` (and one engine per DLA core) from\n"
        f"`{noqdq_name(onnx_name)}` (the model without Q/DQ) and `{CALIBRATION_CACHE}` (the same INT8\n"
        "scales as a TensorRT calibration cache): the DLA has no explicit-Q/DQ path, and DLA builds need\n"
        "TensorRT <= 10.7. On newer TensorRT only the GPU engine is built.\n"
        if dla else ""
    )
    return f"""# {onnx_name} for {t.name}

{t.description}. Precision: **{precision}**, input shape {"x".join(map(str, shape))}.

The engine is built on the device: TensorRT engines are specific to the GPU and the TensorRT
version. `build.sh` finds the TensorRT version on the board and uses the matching trtexec flags
(`--int8 --fp16` up to 10.11, `--stronglyTyped` on 10.12+, no precision flags on 11).

## 1. Copy
```
scp -r BUNDLE user@jetson:~/
```

## 2. Build
```
cd ~/BUNDLE && ./build.sh          # trtexec; EDGERES_TRT_VERSION=... overrides the detected version
edgeres build BUNDLE              # or: the TensorRT Python API (pip install edgeres[jetson])
```
{dla_text}{_runner_readme(meta) if runner else ""}
## {4 if runner else 3}. With edgeres on the device: benchmark, evaluate, predict
```
edgeres bench BUNDLE/{plan.ENGINE_NAME}
edgeres eval BUNDLE/{plan.ENGINE_NAME} --data D      # top-1 error
edgeres predict BUNDLE/{plan.ENGINE_NAME} IMAGE...
```

## Device
{chr(10).join(f for f in facts if f)}

| JetPack | TensorRT |
|---|---|
{jetpack}
"""
