"""The contract every backend passes: subclass `BackendContract` in tests/test_backends_<runtime>.py.

A new runtime is one module in edgeres/backends/, one line in the registry and one subclass here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeres import models, targets
from edgeres.backends import Artifact, RuntimeOptions, get_backend
from edgeres.export import export_onnx


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
