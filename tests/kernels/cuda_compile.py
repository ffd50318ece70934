"""Compile dsx's Triton kernels for a CUDA target on a machine without a GPU (Triton's own ptxas), one line of JSON per
compile: ``{"kernel", "config", "arch", "triton", "seconds", "wgmma"}`` or the same with ``"error"``.

Run as a script with ``TRITON_INTERPRET=0`` (under the interpreter ``@triton.jit`` yields no compilable function):
``python tests/kernels/cuda_compile.py 90 [--all-configs]``. Row kernels compile at the configs their
``prune_row_configs`` keeps for a 1024- and a 65536-wide block, the configs a GPU run would compile.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsx.kernels import (add_layer_norm, add_rms_norm, bias_act, gated_act, int4_mm, int8_mm, quantize_fp8,
                         quantize_per_token, softmax)

FLOATS = {"eps", "amax_min", "scale"}
ROW_BLOCKS = (1024, 65536)
FP8_ARCH = 89

# kernel, pointer types by parameter name, constexpr values (besides each config's own), row kernel (pruned by BLOCK)
CASES: list[tuple[Any, dict[str, str], dict[str, Any], bool]] = [
    (add_layer_norm._add_layer_norm_fwd, {"X": "*bf16", "R": "*bf16", "W": "*bf16", "B": "*bf16", "Y": "*bf16",
                                          "S": "*bf16"}, {"HAS_WEIGHT": True, "HAS_BIAS": True}, True),
    (add_rms_norm._rms_norm_fwd, {"X": "*bf16", "R": "*bf16", "W": "*bf16", "Y": "*bf16", "S": "*bf16"},
     {"HAS_RESIDUAL": True, "HAS_WEIGHT": True}, True),
    (softmax._softmax_fwd, {"X": "*bf16", "M": "*i1", "Y": "*bf16"}, {"MASK_KIND": 1}, True),
    (quantize_per_token._quantize_per_token_fwd, {"X": "*bf16", "Q": "*i8", "S": "*fp32", "A": "*fp32"},
     {"HAS_AMAX": True}, True),
    (quantize_fp8._quantize_fp8_rowwise_fwd, {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "A": "*fp32"},
     {"HAS_AMAX": True}, True),
    (bias_act._bias_act_fwd, {"X": "*bf16", "B": "*bf16", "Y": "*bf16"},
     {"HAS_BIAS": True, "ACT": bias_act.ACTS["gelu"]}, False),
    (gated_act._gated_act_fwd, {"G": "*bf16", "U": "*bf16", "Y": "*bf16"}, {"ACT": bias_act.ACTS["silu"]}, False),
    (int8_mm._int8_scaled_mm_fwd, {"A": "*i8", "B": "*i8", "AS": "*fp32", "BS": "*fp32", "BIAS": "*bf16",
                                   "C": "*bf16"}, {"HAS_BIAS": True}, False),
    (int8_mm._int8_weight_only_mm_fwd, {"X": "*bf16", "W": "*i8", "WS": "*fp32", "BIAS": "*bf16", "Y": "*bf16"},
     {"HAS_BIAS": True, "IEEE": False}, False),
    (int8_mm._int8_weight_only_mm_fwd, {"X": "*fp32", "W": "*i8", "WS": "*fp32", "BIAS": "*fp32", "Y": "*fp32"},
     {"HAS_BIAS": True, "IEEE": True}, False),
    (int4_mm._int4_weight_only_mm_fwd, {"X": "*bf16", "QW": "*u8", "S": "*fp32", "Z": "*fp32", "BIAS": "*bf16",
                                        "Y": "*bf16"}, {"HAS_BIAS": True, "IEEE": False}, False),
]


def configs(kernel: Any, constexprs: dict[str, Any], row: bool,
            all_configs: bool) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(config, extra constexprs)`` pairs to compile: every config the kernel's own pruning keeps (row kernels: per
    block width; GEMMs: at an M that keeps every tile height), or the first one."""
    for extra in ({"BLOCK": block} for block in ROW_BLOCKS) if row else [{}]:
        kept = kernel.early_config_prune(kernel.configs, {"M": 4096}, **constexprs, **extra)
        for config in kept if all_configs else kept[:1]:
            yield config, extra


def compile_one(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], arch: int) -> dict[str, Any]:
    fn, signature, values = kernel.fn, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], values[(i,)] = "constexpr", constexprs[p.name]
        else:
            signature[p.name] = pointers.get(p.name, "fp32" if p.name in FLOATS else "i32")
    options = {k: constexprs[k] for k in ("num_warps", "num_stages")}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, values), target=GPUTarget("cuda", arch, 32), options=options)
    return {"seconds": round(time.perf_counter() - start, 2), "wgmma": "wgmma" in compiled.asm.get("ptx", "")}


def main() -> None:
    arch, all_configs = int(sys.argv[1]), "--all-configs" in sys.argv
    for kernel, pointers, constexprs, row in CASES:
        if arch < FP8_ARCH and any("fp8" in t for t in pointers.values()):
            continue  # e4m3 needs sm89+ (dsx's fp8 format refuses older GPUs)
        for config, extra in configs(kernel, constexprs, row, all_configs):
            values = {**constexprs, **config.kwargs, **extra, "num_warps": config.num_warps,
                      "num_stages": config.num_stages}
            line: dict[str, Any] = {"kernel": kernel.fn.__name__, "config": str(config), "arch": arch,
                                    "triton": triton.__version__,
                                    "pointers": pointers.get("X", pointers.get("A"))}
            try:
                line.update(compile_one(kernel, pointers, values, arch))
            except Exception as e:  # reported per config, so one failure does not hide the others
                line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
