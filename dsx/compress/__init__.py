"""Compression: pruning, 2:4 sparsity and distillation."""

from dsx.compress.distill import Distill, DistillationLoss, distill
from dsx.compress.layer_rules import LayerRule, register_layer
from dsx.compress.masks import MakePermanent, make_permanent
from dsx.compress.prune import Prune, prune
from dsx.compress.schedule import PruningSchedule
from dsx.compress.sparsity import Sparsify, sparsify

__all__ = [
    "Distill", "DistillationLoss", "LayerRule", "MakePermanent", "Prune", "PruningSchedule", "Sparsify", "distill",
    "make_permanent", "prune", "register_layer", "sparsify",
]
