"""dsx: make ordinary PyTorch modules smaller and faster with composable, verified transforms.

Public API only; everything here is re-exported from the subpackages.
"""

from dsx import export, parallel
from dsx.api import optimize
from dsx.compress import (
    Distill, LayerRule, MakePermanent, Prune, PruningSchedule, Sparsify, distill, make_permanent, prune, register_layer,
    sparsify,
)
from dsx.core.compose import Compose, compose
from dsx.core.recipe import from_recipe, to_recipe
from dsx.core.report import Report, report
from dsx.core.serialize import load, save
from dsx.core.summary import Summary, summary
from dsx.core.transform import Transform, VerificationError, history
from dsx.graph.backend import compile_backend
from dsx.graph.capture import Captured, capture
from dsx.graph.compiled import Compile
from dsx.graph.fuse import Fuse, fusions
from dsx.graph.pass_manager import available_passes
from dsx.pretrained import from_pretrained
from dsx.quant import Convert, Quantize, convert, quantize

__version__ = "0.1.0"

__all__ = [
    "Captured", "Compile", "Compose", "Convert", "Distill", "Fuse", "LayerRule", "MakePermanent", "Prune",
    "PruningSchedule", "Quantize", "Report", "Sparsify", "Summary", "Transform", "VerificationError",
    "available_passes", "capture", "compile_backend", "compose", "convert", "distill", "export", "from_pretrained",
    "from_recipe", "fusions", "history", "load", "make_permanent", "optimize", "parallel", "prune", "quantize",
    "register_layer", "report", "save", "sparsify", "summary", "to_recipe",
]
