"""Graph pass fusing the gated MLP product ``act(a) * b`` (SwiGLU / GeGLU) into one ``dsx::gated_act`` node.

Llama-style MLPs compute ``down(act(gate(x)) * up(x))``; the fused op never stores ``act(gate(x))``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import dsx.kernels.gated_act  # noqa: F401  (registers torch.ops.dsx.gated_act)
from dsx.graph.fx_utils import arg, erase_dead, is_call, only_user, tensor_meta
from dsx.graph.pass_manager import register

aten = torch.ops.aten


def activation_name(node: object) -> str | None:
    """The ``dsx`` activation name of a ``silu`` / ``gelu`` node ("silu", "gelu", "gelu_tanh"), else None."""
    if is_call(node, aten.silu.default):
        return "silu"
    if is_call(node, aten.gelu.default):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(arg(node, 1, "approximate", "none"))
    return None


def _same_tensors(*nodes: object) -> bool:
    """Whether all nodes carry floating tensors of one shape, dtype and device."""
    vals = [tensor_meta(n) for n in nodes]
    if any(v is None for v in vals) or not vals[0].dtype.is_floating_point:
        return False
    return all(v.shape == vals[0].shape and v.dtype == vals[0].dtype and v.device == vals[0].device for v in vals)


@register("gated_mlp", kernel=True)
def gated_mlp(gm: fx.GraphModule) -> int:
    """Fuse ``act(a) * b`` (act = silu or gelu, a and b of one shape) into ``dsx.gated_act(a, b, act)``."""
    count = 0
    for mul in list(gm.graph.nodes):
        if not is_call(mul, aten.mul.Tensor) or len(mul.args) != 2 or mul.kwargs:
            continue
        for act_node, up in (mul.args, mul.args[::-1]):
            act = activation_name(act_node)
            if act is None or only_user(act_node) is not mul or not _same_tensors(act_node.args[0], up, mul):
                continue
            with gm.graph.inserting_before(mul):
                fused = gm.graph.call_function(torch.ops.dsx.gated_act.default, (act_node.args[0], up, act))
            fused.meta["val"] = mul.meta["val"]
            mul.replace_all_uses_with(fused)
            erase_dead(gm, [act_node, mul])
            count += 1
            break
    return count
