"""The built-in graph passes; importing this package registers them, in run order.

Structural rewrites first (dropout removal, BatchNorm folding, attention to SDPA), then kernel fusions.
"""

from dsx.graph.passes import (  # noqa: F401  (import order is run order)
    remove_dropout,
    fold_batch_norm,
    attention,
    add_layer_norm,
    add_rms_norm,
    gated_mlp,
    bias_act,
    softmax,
)
