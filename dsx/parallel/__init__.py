"""Distributed dsx on torch.distributed: compressed-gradient DDP hooks, tensor parallelism for quantized linears,
pipeline stages, FSDP2 / DDP support for QAT and masked models, distributed calibration and resumable checkpoints."""

from dsx.core.dist import all_reduce_scalar, distributed_active
from dsx.parallel.checkpoint import AsyncCheckpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from dsx.parallel.comm import SPECS, CommStats, compress_gradients
from dsx.parallel.pipeline import Pipeline, pipeline
from dsx.parallel.sharding import check_qat_scales, full_state_dict, prepare_for_ddp, shard
from dsx.parallel.tensor_parallel import STYLES, default_plan, tensor_parallel
from dsx.quant.sync import sync_observers

__all__ = [
    "AsyncCheckpoint", "SPECS", "STYLES", "CommStats",
    "all_reduce_scalar", "check_qat_scales", "compress_gradients", "default_plan", "distributed_active",
    "full_state_dict", "latest_checkpoint", "load_checkpoint", "prepare_for_ddp", "save_checkpoint", "shard",
    "sync_observers", "tensor_parallel",
    "Pipeline", "pipeline",
]
