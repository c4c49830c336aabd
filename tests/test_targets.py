"""Target profiles: every shipped file loads, bad files fail naming file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeres import targets
from edgeres.errors import TargetError

REQUIRED = {
    "jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-orin-nano",
    "jetson-orin-nx", "jetson-agx-orin", "gpu-tensorrt", "cpu",
}

GOOD = """
name = "{name}"
description = "test board"
runtime = "tensorrt"
precisions = ["fp32", "fp16", "int8"]
default_precision = "int8"
qdq_flavour = "tensorrt"
default_batch = 1
memory_mb = 4096
dla_cores = 1

[onnx_opset]
min = 13
max = 17

[tensorrt]
min = "8.5.2"
max = "10.3.0"

[[tensorrt.jetpack]]
jetpack = "6.1"
tensorrt = "10.3.0"
"""


def write(tmp_path: Path, text: str, name: str = "board") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("{name}", name))
    return path


def test_every_required_target_is_a_file_and_loads():
    names = {t.name for t in targets.list_targets()}
    assert names >= REQUIRED
    for name in REQUIRED:
        assert (targets.targets_dir() / f"{name}.toml").is_file()


def test_jetson_alias_is_the_orin_nano():
    t = targets.load("jetson")
    assert t.name == "jetson-orin-nano"
    assert t.compute_capability == "8.7" and t.memory_mb == 8192 and not t.has_dla


def test_profile_fields():
    nano, orin, cpu = targets.load("jetson-nano"), targets.load("jetson-agx-orin"), targets.load("cpu")
    assert cpu.runtime == "onnxruntime" and cpu.qdq_flavour == "cpu" and cpu.tensorrt is None
    assert nano.runtime == "tensorrt" and not nano.supports("int8") and nano.supports("fp16")
    assert orin.has_dla and orin.dla_cores == 2 and orin.supports("int8")
    assert orin.tensorrt.admits("10.3.0") and orin.tensorrt.admits("11.4.1")
    assert not orin.tensorrt.admits("8.2.1")
    assert ("6.1", "10.3.0") in {(r.jetpack, r.tensorrt) for r in orin.tensorrt.jetpack}
    assert targets.load("gpu-tensorrt").tensorrt.admits("11.7.0")  # max "11" admits any 11.x
    assert targets.load("jetson-xavier-nx").tensorrt.versions()[-1] == "8.5.2"


@pytest.mark.parametrize("name", ["jetson-nano", "jetson-tx2"])
def test_int8_on_maxwell_and_pascal_is_a_clear_error(name):
    with pytest.raises(TargetError, match=r"does not support int8.*use fp16"):
        targets.load(name).require("int8")
    targets.load(name).require("fp16")


def test_unknown_precision_and_target():
    with pytest.raises(TargetError, match="unknown precision 'int4'"):
        targets.load("cpu").require("int4")
    with pytest.raises(TargetError, match="unknown target 'jetson-thor'.*jetson-orin-nx"):
        targets.load("jetson-thor")


def test_load_by_path_and_env(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    t = targets.load(path)
    assert t.name == "board" and t.dla_cores == 1 and t.source == path
    assert targets.load(str(path)).tensorrt.versions() == ("10.3.0",)
    monkeypatch.setenv("EDGERES_TARGETS", str(tmp_path))
    assert [x.name for x in targets.list_targets()] == ["board"]
    assert targets.load("board").memory_mb == 4096


@pytest.mark.parametrize(
    ("edit", "key", "msg"),
    [
        (lambda s: s.replace('runtime = "tensorrt"\n', ""), "runtime", "is missing"),
        (lambda s: s.replace('runtime = "tensorrt"', 'runtime = "tflite"'), "runtime", "unknown value"),
        (lambda s: s.replace('"fp16", "int8"]', '"fp16", "int4"]'), "precisions", "unknown precision 'int4'"),
        (lambda s: s.replace("memory_mb = 4096", 'memory_mb = "4GB"'), "memory_mb", "must be int"),
        (lambda s: s.replace("default_batch = 1", "default_batch = true"), "default_batch", "must be int"),
        (lambda s: s.replace("default_batch = 1", "default_batch = 0"), "default_batch", "must be positive"),
        (lambda s: s.replace("max = 17", "max = 11"), "onnx_opset.min", "above max"),
        (lambda s: s.replace('max = "10.3.0"', 'max = "ten"'), "tensorrt.max", "must be a version"),
        (lambda s: s.replace('tensorrt = "10.3.0"', 'tensorrt = "11.0.0"'), "tensorrt.jetpack[0].tensorrt",
         "outside"),
        (lambda s: s.replace('default_precision = "int8"', 'default_precision = "fp8"'), "default_precision",
         "unknown value"),
        (lambda s: 'colour = "green"\n' + s, "colour", "not a known key"),
        (lambda s: s.replace('name = "board"', 'name = "other"'), "name", "must match the file name"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path, edit, key, msg):
    path = write(tmp_path, edit(GOOD.replace("{name}", "board")))
    with pytest.raises(TargetError) as err:
        targets.load(path)
    text = str(err.value)
    assert str(path) in text and f"'{key}'" in text and msg in text


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "name = \n")
    with pytest.raises(TargetError, match=f"{path}: invalid TOML"):
        targets.load(path)


def test_to_dict_is_json_ready():
    d = json.loads(json.dumps(targets.load("jetson-agx-orin").to_dict()))
    assert d["dla_cores"] == 2 and d["onnx_opset"] == [13, 17] and d["tensorrt"]["max"] == "11.4.1"
    assert d["tensorrt"]["jetpack"][0] == {"jetpack": "5.1.1", "tensorrt": "8.5.2"}
    assert d["source"].endswith("jetson-agx-orin.toml")


def test_target_is_frozen():
    t = targets.load("cpu")
    with pytest.raises(AttributeError):
        t.memory_mb = 1  # type: ignore[misc]
