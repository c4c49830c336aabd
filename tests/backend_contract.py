"""The contract every backend passes: subclass `BackendContract` in tests/test_backends_<runtime>.py.

A new runtime is one module in edgeres/backends/, one line in the registry (`backends/base.py`) and one
subclass of this class: its facts (suffix, runs_on_host, precisions, lint rules), compile, open, flavour,
load, run and the latency measurement are all checked here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeres import models, targets
from edgeres.backends import Artifact, RuntimeOptions, get_backend
from edgeres.backends.base import artifact_suffixes, open_artifact, qdq_flavours
from edgeres.export import export_onnx
from edgeres.latency import BenchOptions, measure


class BackendContract:
    runtime: str = ""
    target: str = ""
    suffix: str = ".onnx"
    precisions: tuple[str, ...] = ("fp32",)  # what compiling an FP32 ONNX may give
    atol: float = 1e-3

    @pytest.fixture(scope="class")
    def fp32(self, tmp_path_factory):
        torch.manual_seed(0)
        model = models.create("wrn-10-1").eval()
        tmp = tmp_path_factory.mktemp(f"contract-{self.runtime}")
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x).numpy()
        return export_onnx(model, tmp / "fp32.onnx", input_size=32), x.numpy(), ref, tmp

    @pytest.fixture(scope="class")
    def compiled(self, fp32):
        onnx_path, x, ref, tmp = fp32
        backend = get_backend(self.runtime)
        artifact = backend.compile(onnx_path, targets.load(self.target), tmp / f"artifact{self.suffix}")
        return backend, artifact, x, ref

    def test_registry_name(self):
        assert get_backend(self.runtime).name == self.runtime

    def test_compile_returns_an_artifact_on_disk(self, compiled):
        _, artifact, _, _ = compiled
        assert isinstance(artifact, Artifact)
        assert artifact.runtime == self.runtime and artifact.path.is_file() and artifact.path.suffix == self.suffix
        assert artifact.precision in self.precisions

    def test_run_matches_pytorch(self, compiled):
        backend, artifact, x, ref = compiled
        session = backend.load(artifact, RuntimeOptions(threads=1))
        out = backend.run(session, x)
        assert out.shape == ref.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=self.atol, atol=self.atol)

    def test_run_takes_any_batch(self, compiled):
        backend, artifact, x, ref = compiled
        session = backend.load(artifact)
        np.testing.assert_allclose(backend.run(session, x[:1]), ref[:1], rtol=self.atol, atol=self.atol)

    def test_states_its_facts(self):
        backend = get_backend(self.runtime)
        assert backend.suffix == self.suffix and backend.suffix in backend.reads
        assert isinstance(backend.runs_on_host, bool) and set(self.precisions) <= set(backend.precisions)
        assert isinstance(backend.custom_domains, frozenset) and all(callable(r) for r in backend.lint_rules)
        assert artifact_suffixes()[self.suffix] == self.runtime
        assert backend.qdq_flavour in qdq_flavours()

    def test_open_reads_precision_and_bytes_from_the_file(self, compiled):
        backend, artifact, _, _ = compiled
        opened = open_artifact(artifact.path)
        assert opened.runtime == self.runtime and opened.precision == artifact.precision
        assert opened.meta["bytes"] >= artifact.path.stat().st_size > 0

    def test_flavour_gives_a_valid_int8_graph_it_opens_as_int8(self, fp32):
        import onnx

        from edgeres.compress.quantize import ptq, strip
        from edgeres.export import export_int8

        onnx_path, x, _, tmp = fp32
        torch.manual_seed(0)
        model = models.create("wrn-10-1").eval()
        example = torch.zeros(1, 3, 32, 32)
        qmodel = ptq(model, [torch.from_numpy(x)], example_input=example)
        backend = get_backend(self.runtime)
        path = export_int8(strip(qmodel, example), tmp / "int8.onnx", backend, input_size=32)
        onnx.checker.check_model(onnx.load(str(path)))
        if backend.runs_on_host:
            artifact = backend.compile(path, targets.load(self.target), tmp / f"int8{self.suffix}")
            assert artifact.precision == "int8" and backend.open(artifact.path).precision == "int8"

    def test_measured_in_a_fresh_worker_where_it_runs(self, compiled):
        backend, artifact, _, _ = compiled
        if not backend.runs_on_host:
            pytest.skip(f"{self.runtime} does not run on this host")
        m = measure(artifact, BenchOptions(batch_sizes=(1, 2), warmup=1, runs=3, threads=1), (3, 32, 32))
        assert [r.batch for r in m.rows] == [1, 2] and m.fresh_process
