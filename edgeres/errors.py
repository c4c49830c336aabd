"""Errors the library raises for bad input; each names the next step for the user."""


class EdgeresError(Exception):
    """A user-facing error: the CLI prints it as one line and exits 1."""


class ModelError(EdgeresError):
    """Unknown model name or invalid architecture arguments."""


class CheckpointError(EdgeresError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class DataError(EdgeresError):
    """Missing, corrupt or unsupported data."""


class TargetError(EdgeresError):
    """A bad target profile, or a request the target cannot serve."""


class ExportError(EdgeresError):
    """A model that cannot be exported or compiled as asked."""
