"""The candidate plans of ``dsx.optimize``: each a name and the dsx transforms that build it from the original.

Formats come from the registry (``dsx.quant.config``), filtered to those fast on the model's device, each tried
alone, mixed with bf16 / fp16 for the layers left float where the hardware computes those natively, and compiled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dsx.compress.sparsity import Sparsify
from dsx.core.transform import Transform
from dsx.graph.compiled import Compile
from dsx.quant.config import COMPUTE_DTYPES, QuantConfig, native_dtype, resolve_config, valid_formats
from dsx.quant.quantize import Quantize

SPARSE = "2:4"
MIXED = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Plan:
    """A candidate: ``name`` for the report, ``quantize`` (the format step, or None) and what follows it."""

    name: str
    quantize: QuantConfig | None = None
    sparsify: bool = False
    compile: bool = False

    def transforms(self, *, quantize: Quantize | None = None, passes: Any = None) -> list[Transform]:
        """The transforms to apply, with ``quantize`` standing in for the default quantize step when given."""
        steps: list[Transform] = []
        if self.sparsify:
            steps.append(Sparsify(SPARSE))
        if self.quantize is not None:
            steps.append(quantize or Quantize(self.quantize, progress=False))
        if self.compile:
            steps.append(Compile(passes))
        return steps


def plan_name(config: QuantConfig) -> str:
    """``int8``, ``int8+bf16`` (int8 linears, the rest in bf16), ``bf16``, ..."""
    if config.dtype is None or config.format in MIXED.values():
        return config.format
    return f"{config.format}+{MIXED[config.dtype]}"


def sparse_fast(device: torch.device) -> bool:
    """2:4 semi-structured kernels run on CUDA sm80+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def check_formats(formats: Any) -> list[Any] | None:
    """Validate ``formats`` (None, or a list of format names, configs or ``"2:4"``); return it as a list.

    Raises:
        TypeError: not a list, or an item of another type.
        ValueError: an unknown format name, or an empty list.
    """
    if formats is None:
        return None
    if isinstance(formats, (str, QuantConfig)) or not isinstance(formats, (list, tuple)):
        raise TypeError(f"formats: expected a list of format names or dsx.quant configs, got {type(formats).__name__}")
    if not formats:
        raise ValueError("formats: the list is empty; pass None to try every format fast on this device")
    for f in formats:
        if f == SPARSE or isinstance(f, QuantConfig):
            continue
        if not isinstance(f, str):
            raise TypeError(f"formats: expected format names or dsx.quant configs, got {type(f).__name__}")
        if f not in valid_formats() and f not in plan_names():
            raise ValueError(f"formats: unknown format {f!r}; valid formats are "
                             f"{sorted({*valid_formats(), *plan_names(), SPARSE})}")
    return list(formats)


def plan_names() -> list[str]:
    """The mixed names the search accepts too (``int8+bf16``, ...)."""
    return [f"{f}+{short}" for f in valid_formats() for short in MIXED.values() if f not in MIXED.values()]


def _resolve(name: Any) -> QuantConfig:
    if isinstance(name, QuantConfig):
        return name
    base, _, mixed = name.partition("+")
    config = resolve_config(base)
    dtype = {v: k for k, v in MIXED.items()}.get(mixed)
    return dataclasses.replace(config, dtype=dtype) if dtype else config


def format_configs(device: torch.device, formats: Sequence[Any] | None, calibrated: bool) -> list[QuantConfig]:
    """The configs to try: ``formats`` as given, else every registered format fast on ``device`` (calibrated ones
    only with calibration data), each also mixed with every native float dtype."""
    if formats is not None:
        return [_resolve(f) for f in formats if f != SPARSE]
    configs = []
    for name in valid_formats():
        config = resolve_config(name)
        if (config.needs_calibration() and not calibrated) or config.unsupported(device) or not config.fast_on(device):
            continue
        configs.append(config)
        if config.quantizes_linears and config.dtype is None and config.linear is not None:
            configs += [dataclasses.replace(config, dtype=d) for d, t in COMPUTE_DTYPES.items()
                        if native_dtype(device, t)]
    return configs


def candidates(device: torch.device, *, lossy: bool, formats: Sequence[Any] | None, calibrated: bool,
               compile: bool) -> list[Plan]:
    """Every plan to try, in order: compiled original, then each format alone and compiled (where the format is fast
    compiled on ``device``)."""
    plans = [Plan("compile", compile=True)] if compile else []
    if not lossy:
        return plans
    for config in format_configs(device, formats, calibrated):
        plans.append(Plan(plan_name(config), config))
        if compile and config.compiles_fast(device):
            plans.append(Plan(plan_name(config) + "+compile", config, compile=True))
    if (formats is None and sparse_fast(device)) or (formats is not None and SPARSE in formats):
        half = resolve_config("bf16" if native_dtype(device, torch.bfloat16) else "fp16")
        plans.append(Plan(f"2:4+{half.format}", half, sparsify=True))
    return plans
