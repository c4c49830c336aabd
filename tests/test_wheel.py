"""The wheel is complete: built from the checkout, installed apart from it, run from elsewhere.

targets/*.toml and calibration/*.toml live at the top of the repository; the wheel must carry them
(edgeres/_data/...), or every non-editable install fails at `edgeres targets`.

The wheel goes (--no-deps) into a folder of its own put first on PYTHONPATH, and its console script runs on
this interpreter: so its dependencies are whatever this interpreter has, be it the system's Python, a venv or a
conda env (a venv made from inside a venv would see the base interpreter's packages, not these), and nothing
is fetched from the network.
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
    """The wheel's edgeres alone in a folder first on PYTHONPATH; its console scripts' folder and the env."""
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
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src), "-w", str(tmp / "dist")])
    wheel = next((tmp / "dist").glob("edgeres-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("targets", "calibration"):
        shipped = {Path(n).name for n in names if n.startswith(f"edgeres/_data/{folder}/")}
        assert shipped == {p.name for p in (ROOT / folder).glob("*.toml")}, f"{folder}/ incomplete in the wheel"
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("EDGERES_TARGETS", "EDGERES_CALIBRATION")}
    env.update(PYTHONPATH=str(site), EDGERES_NO_DOWNLOAD="1", EDGERES_QUIET="1")
    if env.get("EDGERES_DATA"):  # the README passes ../shared/data: relative to the checkout, not to where we run
        env["EDGERES_DATA"] = str(Path(env["EDGERES_DATA"]).resolve())
    bin_dir = site / "bin"
    script = (bin_dir / "edgeres").read_text()
    assert sys.executable in script, f"the console script does not run on {sys.executable}:\n{script[:200]}"
    where = _run([sys.executable, "-c", "import edgeres; print(edgeres.__file__)"], env=env, cwd=tmp).stdout.strip()
    assert Path(where).is_relative_to(site), f"edgeres is imported from {where}, not from the wheel"
    return bin_dir, env


def test_wheel_lists_targets_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    res = _run([str(bin_dir / "edgeres"), "targets", "--json"], env=env, cwd=tmp_path)
    names = {t["name"] for t in json.loads(res.stdout)}
    assert {p.stem for p in (ROOT / "targets").glob("*.toml")} == names
    sources = [Path(t["source"]) for t in json.loads(res.stdout)]
    assert all(s.is_relative_to(bin_dir.parent) for s in sources), sources  # the wheel's copies, not the checkout's


def test_wheel_exports_for_jetson_outside_the_checkout(installed, tmp_path, resnet20_weights):
    bin_dir, env = installed
    out = tmp_path / "bundle"
    _run([str(bin_dir / "edgeres"), "export", "resnet20.cifar10_akamaster", "--target", "jetson-orin-nano", "--int8",
          "--calib", "64", "--eval-limit", "200", "--out", str(out)], env=env, cwd=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "jetson-orin-nano" and manifest["precision"] == "int8"
    assert manifest["quantization"]["calibration"]["name"] == "default"  # calibration/default.toml, from the wheel
    assert (out / "model.onnx").is_file() and (out / "build.json").is_file()
