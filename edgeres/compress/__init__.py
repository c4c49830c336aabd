"""Compression stages in pipeline order: fold BN, prune channels, quantize to int8."""

from edgeres.compress.fold_bn import FoldReport, fold_bn
from edgeres.compress.prune import PruneReport, apply_pruned_spec, prune, pruned_spec

__all__ = ["FoldReport", "PruneReport", "apply_pruned_spec", "fold_bn", "prune", "pruned_spec"]
