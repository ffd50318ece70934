"""Pipeline parallelism for dsx models on torch.distributed.pipelining: the model traced, split into one stage per
rank at block boundaries (or named submodules), and run by torch's GPipe or 1F1B schedule for inference and training."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import Pipe, Schedule1F1B, ScheduleGPipe, SplitPoint
from torch.distributed.pipelining import pipeline as trace_pipeline
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.pipelining.stage import _PipelineStageBase

from dsx.core.dist import collective_device
from dsx.quant.linear import QuantLinear

SCHEDULES: dict[str, type[PipelineScheduleSingle]] = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
"""The schedule names ``pipeline`` takes: torch's single-stage-per-rank schedules."""


class Pipeline:
    """This rank's stage of a model split by ``dsx.parallel.pipeline``, with its torch schedule.

    Every rank of the pipeline group calls ``step`` (or ``eval``) with the same arguments, as with torch's schedules:
    the inputs are read on the first stage, ``target`` on the last, and the merged output (or None on other stages)
    comes back from the last stage. ``module`` holds this rank's parameters (hand them to the optimizer); they are
    the model's own tensors, except parameters several stages use (tied embeddings), which are copies whose
    gradients ``step`` sums across the stages.

    Attributes:
        module: this stage's ``torch.fx.GraphModule`` (parameter names as in the original model).
        stage: torch's ``PipelineStage`` for it.
        schedule: the ``ScheduleGPipe`` / ``Schedule1F1B`` running it.
        stage_index, num_stages, microbatches: where this rank sits and how each batch is chunked.
        training: whether ``step`` runs backward (built with a ``loss_fn``).
    """

    def __init__(self, stage: _PipelineStageBase, schedule: PipelineScheduleSingle, microbatches: int,
                 training: bool, batch_shapes: list[torch.Size | None], tied: list[tuple[str | None, torch.Size]],
                 group: dist.ProcessGroup) -> None:
        self.stage, self.schedule, self.microbatches, self.training = stage, schedule, microbatches, training
        self.module: nn.Module = stage.submod
        self.stage_index, self.num_stages = stage.stage_index, stage.num_stages
        self._batch_shapes, self._tied, self._group = batch_shapes, tied, group

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    def __repr__(self) -> str:
        return (f"Pipeline(stage {self.stage_index} of {self.num_stages}, {type(self.schedule).__name__}, "
                f"{self.microbatches} microbatches)")

    def step(self, *inputs: Any, target: Any = None, losses: list | None = None) -> Any:
        """Run one batch through the schedule: forward only without a ``loss_fn``, else forward and backward.

        Args:
            *inputs: the whole batch, as the model's positional arguments (same shapes as ``example_inputs``).
            target: the whole batch's target for ``loss_fn`` (training); read on the last stage.
            losses: a list that receives the loss of each microbatch on the last stage.

        Returns:
            On the last stage, the outputs of the microbatches concatenated along dim 0 (a model's single output as
            a tensor, several as a tuple); None on the others.
            Training accumulates the gradients into ``module``'s parameters (divided by the number of microbatches,
            torch's ``scale_grads``, so a mean loss gives the full batch's gradient): zero them before each step.

        Raises:
            ValueError: a batch of another shape than ``example_inputs``, or a ``target`` without ``loss_fn``.
        """
        args = self._inputs(inputs, target)
        out = self.schedule.step(*args, target=target if self.is_last else None, losses=losses)
        if self.training and self._tied:
            self._sum_tied_grads()
        return self._unwrap(out)

    def eval(self, *inputs: Any, target: Any = None, losses: list | None = None) -> Any:
        """Forward only through the schedule, also when built with a ``loss_fn``: then ``target`` is needed (torch's
        schedule computes the microbatch losses, into ``losses``) but no gradient is computed. Arguments, return
        value and errors as ``step``; also ValueError when a pipeline built with ``loss_fn`` gets no ``target``."""
        if self.training and target is None:
            raise ValueError("target: eval() of a pipeline built with loss_fn needs the target (torch's schedule "
                             "computes the losses); build the pipeline without loss_fn for inference alone")
        args = self._inputs(inputs, target)
        return self._unwrap(self.schedule.eval(*args, target=target if self.is_last else None, losses=losses))

    def _inputs(self, inputs: tuple, target: Any) -> tuple:
        if target is not None and not self.training:
            raise ValueError("target: given, but the pipeline was built without loss_fn (inference only)")
        if not self.is_first:
            return ()
        shapes = [x.shape if isinstance(x, torch.Tensor) else None for x in inputs]
        if shapes != self._batch_shapes:
            raise ValueError(f"inputs: the pipeline was traced for batches of shapes {self._batch_shapes} "
                             f"(example_inputs), got {shapes}")
        return inputs

    @staticmethod
    def _unwrap(out: Any) -> Any:
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out

    def _sum_tied_grads(self) -> None:
        """All-reduce the gradients of parameters several stages hold copies of, so each copy gets the gradient
        of the one parameter of the original model (a stage without the parameter contributes zeros)."""
        device = self.stage.device
        params = [None if name is None else self.module.get_parameter(name) for name, _ in self._tied]
        flat = torch.cat([p.grad.reshape(-1).float() if p is not None and p.grad is not None else
                          torch.zeros(shape.numel(), device=device) for p, (_, shape) in zip(params, self._tied)])
        dist.all_reduce(flat, group=self._group)
        for p, chunk in zip(params, flat.split([shape.numel() for _, shape in self._tied])):
            if p is not None:
                p.grad = chunk.view_as(p).to(p.dtype).clone()


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _schedule_class(schedule: Any) -> type[PipelineScheduleSingle]:
    if isinstance(schedule, type) and issubclass(schedule, PipelineScheduleSingle):
        return schedule
    if not isinstance(schedule, str) or schedule.lower() not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)} (or a torch PipelineScheduleSingle "
                         f"class), got {schedule!r}")
    return SCHEDULES[schedule.lower()]


def _group(mesh: DeviceMesh | None) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("dsx.parallel.pipeline needs an initialized process group, one rank per stage: call "
                           "torch.distributed.init_process_group() first (a 1-rank group runs the model as 1 stage)")
    if mesh is None:
        return dist.group.WORLD
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh: expected a DeviceMesh or None, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"mesh: expected a 1-D DeviceMesh, got {mesh.ndim} dims: pass the pipeline dimension "
                         "(e.g. mesh['pp'])")
    return mesh.get_group()


def _weight(module: nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def _blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The blocks: the children of the container with numbered children (an ``nn.ModuleList`` / ``nn.Sequential``, or
    its holder in a captured graph) that holds the most weights, the first met on a tie (so a model's layers, not
    the experts of one of them)."""
    lists = []
    for name, m in model.named_modules():
        children = [n for n, _ in m.named_children() if n != "_guards_fn"]
        if children and children == [str(i) for i in range(len(children))]:
            lists.append((name, [getattr(m, n) for n in children]))
    if not lists:
        raise ValueError(f"split_spec: {type(model).__name__} has no nn.ModuleList / nn.Sequential of blocks to split "
                         "at; name the submodules each stage starts at (split_spec=['layers.4', ...])")
    return max(lists, key=lambda item: sum(_weight(b) for b in item[1]))


def _default_spec(model: nn.Module, stages: int) -> dict[str, SplitPoint]:
    """Split points before blocks ``i * n // stages`` of the blocks: stage sizes differ by at most one block."""
    if stages == 1:
        return {}
    name, blocks = _blocks(model)
    if stages > len(blocks):
        raise ValueError(f"stages: {stages} stages but {type(model).__name__} has {len(blocks)} blocks in "
                         f"{name!r}: at most {len(blocks)} stages split it at block boundaries")
    prefix = f"{name}." if name else ""
    return {f"{prefix}{i * len(blocks) // stages}": SplitPoint.BEGINNING for i in range(1, stages)}


def _user_spec(model: nn.Module, split_spec: Any) -> dict[str, SplitPoint]:
    """``split_spec`` as torch's ``{name: SplitPoint}``: a list of names splits before each of them."""
    if isinstance(split_spec, str):
        split_spec = [split_spec]
    if isinstance(split_spec, Mapping):
        spec = dict(split_spec)
    elif isinstance(split_spec, Sequence):
        spec = {name: SplitPoint.BEGINNING for name in split_spec}
        if len(spec) != len(split_spec):
            raise ValueError(f"split_spec: names a submodule twice: {list(split_spec)}")
    else:
        raise TypeError(f"split_spec: expected a list of submodule names or a dict name -> SplitPoint, got "
                        f"{type(split_spec).__name__}")
    names = [n for n, _ in model.named_modules() if n]
    for name, point in spec.items():
        if not isinstance(name, str) or name not in names:
            close = difflib.get_close_matches(str(name), names, n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"split_spec: {name!r} is not a submodule of {type(model).__name__}{hint}")
        if not isinstance(point, SplitPoint):
            raise TypeError(f"split_spec: {name!r} maps to {point!r}, expected a torch SplitPoint")
    return spec


def _microbatch(inputs: tuple, microbatches: int) -> tuple:
    """The first of ``microbatches`` equal chunks (along dim 0) of the batch: what the stages are traced with."""
    chunks, _ = split_args_kwargs_into_chunks(inputs, {}, microbatches)
    shapes = [[x.shape for x in chunk if isinstance(x, torch.Tensor)] for chunk in chunks]
    if len(chunks) != microbatches or any(s != shapes[0] for s in shapes):
        batch = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
        raise ValueError(f"example_inputs: a batch of shapes {batch} does not split into {microbatches} equal "
                         "microbatches along dim 0 (microbatches)")
    return chunks[0]


def _split_graph(names: list[str], gm: fx.GraphModule) -> fx.GraphModule:
    """torch's ``split_policy`` for a captured (fused) model, whose submodules only hold tensors: a ``pipe_split``
    before the first node that computes with a tensor of each named submodule."""
    for name in names:
        reads = {n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(f"{name}.")}
        first = next((n for n in gm.graph.nodes if n.op != "get_attr" and reads & set(n.all_input_nodes)), None)
        if first is None:
            raise ValueError(f"split_spec: nothing in the captured graph computes with the tensors of {name!r}")
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.ops.pippy._pipe_split.default, ())  # what torch's pipe_split() traces to
    gm.recompile()
    return gm


def _trace(model: nn.Module, mb_args: tuple, spec: dict[str, SplitPoint]) -> Pipe:
    """torch's ``pipeline()``: split points on the submodules of ``spec`` (the wrappers torch puts on them are taken
    off after), or for a captured graph, ``pipe_split`` calls inserted into the traced graph."""
    if isinstance(model, fx.GraphModule):
        if any(point is not SplitPoint.BEGINNING for point in spec.values()):
            raise ValueError("split_spec: a captured (fused) graph splits at the beginning of submodules only")
        try:
            return trace_pipeline(model, mb_args, split_policy=partial(_split_graph, list(spec)))
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nA captured (fused) model is specialized to its example shapes: capture it with "
                               "dynamic_batch=True (dsx.Fuse) or at the microbatch's shape") from e
    attrs = ("forward", "_orig_forward")
    saved = {name: {a: model.get_submodule(name).__dict__.get(a) for a in attrs} for name in spec}
    try:
        return trace_pipeline(model, mb_args, split_spec=spec)
    finally:
        for name, before in saved.items():
            state = model.get_submodule(name).__dict__
            for attr, value in before.items():
                if value is None:
                    state.pop(attr, None)
                else:
                    state[attr] = value


def _tied(pipe: Pipe, rank: int, model: nn.Module) -> list[tuple[str | None, torch.Size]]:
    """``(name on this stage or None, shape)`` of each parameter several stages hold a copy of (torch's
    ``replicated_params``). Other names this stage has for it (the tied head of an embedding) are bound to its copy,
    or dropped when the stage has none, instead of the model's own tensor."""
    stage_name = [name for name, _ in pipe.split_gm.named_children()][rank]
    module, originals = pipe.split_gm.get_submodule(stage_name), dict(model.named_parameters(remove_duplicate=False))
    tied = []
    for users in pipe.replicated_params:
        holder, qualname = next(iter(users.items()))
        mine = users.get(stage_name)
        copy = None if mine is None else module.get_parameter(mine)
        for path, p in list(module.named_parameters(remove_duplicate=False)):
            if p is originals.get(qualname) and path != mine:
                parent, _, attr = path.rpartition(".")
                delattr(module.get_submodule(parent), attr)
                if copy is not None:
                    setattr(module.get_submodule(parent), attr, copy)
        tied.append((mine, pipe.split_gm.get_submodule(holder).get_parameter(qualname).shape))
    return tied


def pipeline(model: nn.Module, example_inputs: Any, stages: int | None = None, mesh: DeviceMesh | None = None, *,
             split_spec: Sequence[str] | Mapping[str, SplitPoint] | None = None, schedule: str | type = "gpipe",
             microbatches: int | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
             scale_grads: bool = True, device: torch.device | str | None = None) -> Pipeline:
    """Split ``model`` into pipeline stages, one per rank, and return this rank's stage with its schedule.

    Every rank of the group calls it with the same model and inputs. The model (float, quantized, pruned, QAT:
    anything ``torch.export`` traces) is traced by ``torch.distributed.pipelining.pipeline`` on a microbatch of
    ``example_inputs`` and split before the submodules of ``split_spec``; by default into ``stages`` even runs of its
    blocks (the children of the ``nn.ModuleList`` / ``nn.Sequential`` holding the most weights; the first stage also
    holds the embeddings, the last the head). A captured, fused ``GraphModule`` (``dsx.Fuse(dynamic_batch=True)``)
    is split by torch's ``pipe_split`` markers, put before the first node computing with each split submodule's
    tensors. The model's train / eval mode at this call is the one traced. At world size 1 the whole model is one
    stage and the schedule still chunks batches into microbatches (and computes losses).

    Args:
        model: the model; not changed (the stages share its parameters and buffers).
        example_inputs: a whole batch (a Tensor or a tuple of positional arguments), as later given to ``step``.
        stages: the number of stages; must equal the pipeline group's size (default: that size).
        mesh: a 1-D ``DeviceMesh`` whose group runs the pipeline (e.g. ``mesh["pp"]``); None: the default group.
        split_spec: submodule names each stage after the first starts at (``["blocks.2"]``), or torch's
            ``{name: SplitPoint.BEGINNING | SplitPoint.END}``; None splits the blocks evenly.
        schedule: ``"gpipe"`` or ``"1f1b"`` (or a torch ``PipelineScheduleSingle`` subclass).
        microbatches: how many microbatches each batch is split into along dim 0 (default: ``stages``; 1F1B needs
            at least ``stages``).
        loss_fn: ``loss_fn(output, target) -> loss`` for training (``step`` then runs backward); None: inference.
        scale_grads: divide gradients by ``microbatches`` (right for a mean-reduced ``loss_fn``), as torch does.
        device: this rank's device (default: the current CUDA device for NCCL, else the CPU).

    Returns:
        A ``Pipeline``: ``step(*inputs, target=None, losses=None)`` / ``eval(...)`` run a batch; ``module`` holds
        this rank's parameters.

    Raises:
        TypeError: ``stages`` / ``microbatches`` not an int, ``split_spec`` or ``mesh`` of the wrong type.
        ValueError: ``stages`` < 1, more than the model's blocks or not the group's size; a ``split_spec`` name that
            is not a submodule; an unknown ``schedule``; a batch that does not split into equal microbatches.
        RuntimeError: no initialized process group, or a model ``torch.export`` cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if stages is not None:
        _check_int("stages", stages)
    if microbatches is not None:
        _check_int("microbatches", microbatches)
    schedule_cls = _schedule_class(schedule)
    if loss_fn is not None and any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("loss_fn: the traced graph of a model with dsx quantized linears (int8 / fp8 / int4 "
                         "kernels) has no backward; pipeline it for inference, or train its QAT form "
                         "(dsx.quantize(..., qat=True)) and convert after")
    spec = None if split_spec is None else _user_spec(model, split_spec)
    if spec is not None and stages is not None and stages != len(spec) + 1:
        raise ValueError(f"stages: {stages}, but split_spec names {len(spec)} split points ({len(spec) + 1} stages)")
    if spec is None and stages is not None:
        spec = _default_spec(model, stages)  # a model with too few blocks fails before the group is looked at
    group = _group(mesh)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if stages is None:
        stages = size if spec is None else len(spec) + 1
    if spec is None:
        spec = _default_spec(model, stages)
    if stages != size:
        raise ValueError(f"stages: {stages} stages, but the pipeline group's size is {size}; GPipe / 1F1B run one "
                         "stage per rank")
    microbatches = stages if microbatches is None else microbatches
    if schedule_cls is Schedule1F1B and microbatches < stages:
        raise ValueError(f"microbatches: 1F1B needs at least one microbatch per stage ({stages}), got {microbatches}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    pipe = _trace(model, _microbatch(inputs, microbatches), spec)
    if pipe.num_stages != stages:
        raise ValueError(f"split_spec: {sorted(spec)} gave {pipe.num_stages} stages, expected {stages}: a split "
                         "module must run exactly once in forward")
    tied = _tied(pipe, rank, model)
    device = collective_device(group) if device is None else torch.device(device)
    stage = pipe.build_stage(rank, device, group)
    runner = schedule_cls(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    shapes = [x.shape if isinstance(x, torch.Tensor) else None for x in inputs]
    return Pipeline(stage, runner, microbatches, loss_fn is not None, shapes, tied, group)
