"""Runtimes behind one small interface: `get_backend(runtime).compile / load / run`."""

from edgeres.backends.base import Artifact, Backend, RuntimeOptions, get_backend, list_backends

__all__ = ["Artifact", "Backend", "RuntimeOptions", "get_backend", "list_backends"]
