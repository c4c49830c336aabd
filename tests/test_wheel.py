"""The wheel is complete: built from the checkout, installed in a fresh environment, run from elsewhere.

targets/*.toml and calibration/*.toml live at the top of the repository; the wheel must carry them
(edgeres/_data/...), or every non-editable install fails at `edgeres targets`.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "edgeres", "targets", "calibration")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _can_build_wheels() -> bool:
    """--no-build-isolation builds with this environment's setuptools: bdist_wheel is in it from 70.1, else `wheel`."""
    import importlib.util

    import setuptools

    major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A venv (system site-packages for torch & co.) holding only the wheel's edgeres; its bin and env."""
    if not _can_build_wheels():
        pytest.skip("this environment's setuptools cannot build wheels (needs >= 70.1 or the wheel package)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
          "-w", str(tmp / "dist")])
    wheel = next((tmp / "dist").glob("edgeres-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("targets", "calibration"):
        shipped = {Path(n).name for n in names if n.startswith(f"edgeres/_data/{folder}/")}
        assert shipped == {p.name for p in (ROOT / folder).glob("*.toml")}, f"{folder}/ incomplete in the wheel"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")])
    bin_dir = tmp / "venv" / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q",
          "--disable-pip-version-check", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGERES_TARGETS", "EDGERES_CALIBRATION")}
    env.update(EDGERES_NO_DOWNLOAD="1", EDGERES_QUIET="1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    where = _run([str(bin_dir / "python"), "-c", "import edgeres, sys; print(edgeres.__file__)"], env=env,
                 cwd=tmp).stdout.strip()
    assert Path(where).is_relative_to(tmp / "venv"), f"the venv imports edgeres from {where}, not from the wheel"
    return bin_dir, env


def test_wheel_lists_targets_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    res = _run([str(bin_dir / "edgeres"), "targets", "--json"], env=env, cwd=tmp_path)
    names = {t["name"] for t in json.loads(res.stdout)}
    assert {p.stem for p in (ROOT / "targets").glob("*.toml")} == names
    sources = [str(t["source"]) for t in json.loads(res.stdout)]
    assert all("site-packages" in s and not s.startswith(str(ROOT)) for s in sources), sources


def test_wheel_exports_for_jetson_outside_the_checkout(installed, tmp_path, resnet20_weights):
    bin_dir, env = installed
    out = tmp_path / "bundle"
    _run([str(bin_dir / "edgeres"), "export", "resnet20.cifar10_akamaster", "--target", "jetson-orin-nano", "--int8",
          "--calib", "64", "--eval-limit", "200", "--out", str(out)], env=env, cwd=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "jetson-orin-nano" and manifest["precision"] == "int8"
    assert manifest["quantization"]["calibration"]["name"] == "default"  # calibration/default.toml, from the wheel
    assert (out / "model.onnx").is_file() and (out / "build.json").is_file()
