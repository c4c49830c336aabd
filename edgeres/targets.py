"""Device profiles: read targets/<name>.toml into a frozen, validated `Target`.

Code asks about fields (`target.supports("int8")`, `target.has_dla`), never about names.
Profiles live in `targets/` at the repository root; `EDGERES_TARGETS` points elsewhere, and a
path to a .toml file loads that file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeres.backends.base import list_backends, qdq_flavours
from edgeres.errors import TargetError

PRECISIONS = ("fp32", "fp16", "int8")
TARGETS_ENV = "EDGERES_TARGETS"


def parse_version(text: str) -> tuple[int, ...]:
    """"10.3.0.30" -> (10, 3, 0, 30); raises ValueError on anything else."""
    parts = str(text).strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class JetPackRelease:
    """One JetPack release and the TensorRT it ships."""

    jetpack: str
    tensorrt: str


@dataclass(frozen=True)
class TensorRTSupport:
    """TensorRT versions a device can run. Bounds compare on the common prefix: max "11" admits any
    11.x, and "8.5" is within min "8.5.2"."""

    min: str
    max: str
    jetpack: tuple[JetPackRelease, ...] = ()

    def admits(self, version: str) -> bool:
        v = parse_version(version)
        lo, hi = parse_version(self.min), parse_version(self.max)
        return v[: len(lo)] >= lo[: len(v)] and v[: len(hi)] <= hi[: len(v)]

    def versions(self) -> tuple[str, ...]:
        """Distinct TensorRT versions of the listed JetPack releases, oldest first."""
        seen = {r.tensorrt: None for r in self.jetpack}
        return tuple(sorted(seen, key=parse_version))


@dataclass(frozen=True)
class Target:
    """A deployment target as the toolkit sees it: runtime, precisions, limits and peak figures."""

    name: str
    description: str
    runtime: str
    precisions: tuple[str, ...]
    default_precision: str
    qdq_flavour: str
    default_batch: int
    onnx_opset: tuple[int, int]
    memory_mb: int | None = None
    compute_capability: str | None = None
    dla_cores: int = 0
    peak_int8_tops: float | None = None
    peak_fp16_tflops: float | None = None
    mem_bandwidth_gbs: float | None = None
    tensorrt: TensorRTSupport | None = None
    aliases: tuple[str, ...] = ()
    source: Path | None = field(default=None, compare=False)

    @property
    def has_dla(self) -> bool:
        return self.dla_cores > 0

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def require(self, precision: str) -> None:
        """Raise a TargetError naming what to use instead unless this target runs `precision`."""
        if precision not in PRECISIONS:
            raise TargetError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.supports(precision):
            return
        why = ""
        if self.compute_capability and self.runtime == "tensorrt":
            cc = self.compute_capability
            why = f" (compute capability {cc} has no {precision.upper()} path in TensorRT)"
        instead = "fp16" if self.supports("fp16") else self.default_precision
        raise TargetError(
            f"target {self.name} does not support {precision}{why}; "
            f"use {instead} instead (supported: {', '.join(self.precisions)})"
        )

    def admits_opset(self, opset: int) -> bool:
        return self.onnx_opset[0] <= opset <= self.onnx_opset[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (for `edgeres targets --json` and reports)."""
        d = asdict(self)
        d["source"] = str(self.source) if self.source else None
        return d


# --- locating profiles -------------------------------------------------------------------------------


def targets_dir() -> Path:
    """`EDGERES_TARGETS` if set, else the shipped profiles: `targets/` at the repository root.

    edgeres/_data/targets is a link to it in a checkout (editable install) and a copy inside a wheel.
    """
    env = os.environ.get(TARGETS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "_data" / "targets"


def _profile_paths() -> list[Path]:
    d = targets_dir()
    if not d.is_dir():
        raise TargetError(f"no target profiles found in {d}; set {TARGETS_ENV} to a folder of .toml files")
    return sorted(d.glob("*.toml"))


def list_targets() -> list[Target]:
    """Every profile in the targets folder, sorted by name."""
    return sorted((load_file(p) for p in _profile_paths()), key=lambda t: t.name)


def load(name_or_path: str | os.PathLike) -> Target:
    """Load a target by name ("jetson-orin-nano"), alias ("jetson") or path to a .toml file."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".toml") or os.sep in text:
        if not path.is_file():
            raise TargetError(f"target file {path} not found")
        return load_file(path)
    paths = _profile_paths()
    for p in paths:
        if p.stem == text:
            return load_file(p)
    for p in paths:
        target = load_file(p)
        if text in target.aliases:
            return target
    names = ", ".join(p.stem for p in paths)
    raise TargetError(f"unknown target {text!r}; choose one of: {names} (or pass a .toml path)")


# --- validation --------------------------------------------------------------------------------------


class _Reader:
    """Typed access to one TOML table that names the file and key in every error."""

    def __init__(self, data: dict[str, Any], path: Path, prefix: str = "") -> None:
        self.data, self.path, self.prefix = data, path, prefix

    def fail(self, key: str, msg: str) -> TargetError:
        return TargetError(f"{self.path}: key '{self.prefix}{key}' {msg}")

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
        if key not in self.data:
            if required:
                raise self.fail(key, "is missing")
            return None
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass in Python but never a valid number here.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"must be {names}, got {type(value).__name__} {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in allowed:
            raise self.fail(key, f"has unknown value {value!r}; allowed: {', '.join(allowed)}")
        return value

    def positive(self, key: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
        value = self.get(key, kind, required=required)
        if value is not None and value <= 0:
            raise self.fail(key, f"must be positive, got {value}")
        return value

    def version(self, key: str) -> str:
        value = self.get(key, str)
        try:
            parse_version(value)
        except ValueError:
            raise self.fail(key, f"must be a version like \"10.3.0\", got {value!r}") from None
        return value

    def table(self, key: str, *, required: bool = True) -> _Reader | None:
        value = self.get(key, dict, required=required)
        return None if value is None else _Reader(value, self.path, f"{self.prefix}{key}.")

    def unknown_keys(self, known: set[str]) -> None:
        extra = sorted(set(self.data) - known)
        if extra:
            raise self.fail(extra[0], f"is not a known key; known: {', '.join(sorted(known))}")


_KEYS = {
    "name", "description", "runtime", "precisions", "default_precision", "qdq_flavour", "default_batch",
    "onnx_opset", "memory_mb", "compute_capability", "dla_cores", "peak_int8_tops", "peak_fp16_tflops",
    "mem_bandwidth_gbs", "tensorrt", "aliases",
}


def load_file(path: str | os.PathLike) -> Target:
    """Parse and validate one profile; every error names the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TargetError(f"cannot read target file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TargetError(f"{path} is not a text (TOML) target profile ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: invalid TOML: {exc}") from exc
    r = _Reader(data, path)
    r.unknown_keys(_KEYS)

    runtime = r.choice("runtime", tuple(list_backends()))
    precisions = tuple(_str_list(r, "precisions"))
    for p in precisions:
        if p not in PRECISIONS:
            raise r.fail("precisions", f"has unknown precision {p!r}; allowed: {', '.join(PRECISIONS)}")
    if not precisions:
        raise r.fail("precisions", "must not be empty")
    default_precision = r.choice("default_precision", PRECISIONS)
    if default_precision not in precisions:
        raise r.fail("default_precision", f"{default_precision!r} is not in precisions {list(precisions)}")

    opset = r.table("onnx_opset")
    lo, hi = opset.positive("min", int), opset.positive("max", int)
    if lo > hi:
        raise opset.fail("min", f"({lo}) is above max ({hi})")

    cc = r.get("compute_capability", str, required=False)
    if cc is not None:
        try:
            if len(parse_version(cc)) != 2:
                raise ValueError(cc)
        except ValueError:
            raise r.fail("compute_capability", f"must look like \"8.7\", got {cc!r}") from None

    dla_cores = r.get("dla_cores", int, required=False) or 0
    if dla_cores < 0:
        raise r.fail("dla_cores", f"must be >= 0, got {dla_cores}")

    trt = _tensorrt_support(r) if runtime == "tensorrt" else None
    if runtime != "tensorrt" and "tensorrt" in data:
        raise r.fail("tensorrt", f"only applies to runtime 'tensorrt', not {runtime!r}")

    target = Target(
        name=r.get("name", str),
        description=r.get("description", str),
        runtime=runtime,
        precisions=precisions,
        default_precision=default_precision,
        qdq_flavour=r.choice("qdq_flavour", qdq_flavours()),
        default_batch=r.positive("default_batch", int),
        onnx_opset=(lo, hi),
        memory_mb=r.positive("memory_mb", int, required=False),
        compute_capability=cc,
        dla_cores=dla_cores,
        peak_int8_tops=_float(r, "peak_int8_tops"),
        peak_fp16_tflops=_float(r, "peak_fp16_tflops"),
        mem_bandwidth_gbs=_float(r, "mem_bandwidth_gbs"),
        tensorrt=trt,
        aliases=tuple(_str_list(r, "aliases", required=False)),
        source=path,
    )
    if target.name != path.stem:
        raise r.fail("name", f"{target.name!r} must match the file name {path.stem!r}")
    return target


def _float(r: _Reader, key: str) -> float | None:
    value = r.positive(key, (int, float), required=False)
    return None if value is None else float(value)


def _str_list(r: _Reader, key: str, *, required: bool = True) -> list[str]:
    value = r.get(key, list, required=required) or []
    if not all(isinstance(v, str) for v in value):
        raise r.fail(key, f"must be a list of strings, got {value!r}")
    return value


def _tensorrt_support(r: _Reader) -> TensorRTSupport:
    t = r.table("tensorrt")
    t.unknown_keys({"min", "max", "jetpack"})
    lo, hi = t.version("min"), t.version("max")
    if parse_version(lo) > parse_version(hi):
        raise t.fail("min", f"({lo}) is above max ({hi})")
    releases = []
    for i, item in enumerate(t.get("jetpack", list, required=False) or []):
        if not isinstance(item, dict):
            raise t.fail(f"jetpack[{i}]", "must be a table with keys jetpack and tensorrt")
        jr = _Reader(item, r.path, f"tensorrt.jetpack[{i}].")
        jr.unknown_keys({"jetpack", "tensorrt"})
        rel = JetPackRelease(jetpack=jr.version("jetpack"), tensorrt=jr.version("tensorrt"))
        support = TensorRTSupport(lo, hi)
        if not support.admits(rel.tensorrt):
            raise jr.fail("tensorrt", f"{rel.tensorrt} is outside tensorrt.min/max ({lo} .. {hi})")
        releases.append(rel)
    return TensorRTSupport(min=lo, max=hi, jetpack=tuple(releases))
