"""Each dsx kernel vs the eager PyTorch ops it replaces vs torch.compile of those ops: ms, GB/s, % of peak.

Peak is the device-to-device copy bandwidth measured in the same run. On CPU the dsx ops run their ATen
path (no Triton), so the table there only checks the plumbing; the kernel figures are the CUDA ones.
Run: python benchmarks/bench_kernels.py [--rows 8192 --cols 4096 --dtype bf16]
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F

import dsx.kernels.add_layer_norm  # noqa: F401  (registers torch.ops.dsx.*)
import dsx.kernels.add_rms_norm  # noqa: F401
import dsx.kernels.bias_act  # noqa: F401
import dsx.kernels.gated_act  # noqa: F401
import dsx.kernels.softmax  # noqa: F401
from dsx.core.table import text_table
from dsx.core.timing import measure_ms

dsx_ops = torch.ops.dsx


def eager_add_rms_norm(x, r, w, eps):
    h = x + r
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w, h


def cases(rows: int, cols: int, dtype: torch.dtype, dev: str) -> list[tuple[str, Callable, Callable, int]]:
    """(name, dsx call, eager call, bytes moved) for each kernel at one shape."""
    t = lambda *s: torch.randn(*s, dtype=dtype, device=dev)  # noqa: E731
    x, r, w, b = t(rows, cols), t(rows, cols), t(cols), t(cols)
    n, e = rows * cols, x.element_size()
    heads = 16
    q = int(math.sqrt(rows * cols / heads))
    s = t(1, heads, q, q)
    mask = torch.zeros(1, 1, q, q, dtype=dtype, device=dev).masked_fill(torch.ones(q, q, device=dev).triu(1).bool(),
                                                                        float("-inf"))
    scale = 0.125
    return [
        ("add_layer_norm", lambda: dsx_ops.add_layer_norm(x, r, w, b, 1e-5),
         lambda: (F.layer_norm(x + r, (cols,), w, b, 1e-5), x + r), 4 * n * e),
        ("add_rms_norm", lambda: dsx_ops.add_rms_norm(x, r, w, 1e-6),
         lambda: eager_add_rms_norm(x, r, w, 1e-6), 4 * n * e),
        ("rms_norm", lambda: dsx_ops.rms_norm(x, w, 1e-6),
         lambda: eager_add_rms_norm(x, torch.zeros_like(x), w, 1e-6)[0], 2 * n * e),
        ("bias_gelu", lambda: dsx_ops.bias_act(x, b, "gelu"), lambda: F.gelu(x + b), 2 * n * e),
        ("bias_gelu_tanh", lambda: dsx_ops.bias_act(x, b, "gelu_tanh"),
         lambda: F.gelu(x + b, approximate="tanh"), 2 * n * e),
        ("bias_silu", lambda: dsx_ops.bias_act(x, b, "silu"), lambda: F.silu(x + b), 2 * n * e),
        ("swiglu", lambda: dsx_ops.gated_act(x, r, "silu"), lambda: F.silu(x) * r, 3 * n * e),
        ("geglu", lambda: dsx_ops.gated_act(x, r, "gelu"), lambda: F.gelu(x) * r, 3 * n * e),
        ("softmax_scale_mask", lambda: dsx_ops.scaled_masked_softmax(s, mask, scale),
         lambda: torch.softmax(s * scale + mask, -1), (2 * s.numel() + mask.numel()) * e),
    ]


def peak_gbps(dev: str) -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * src.numel() / ms / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    peak = peak_gbps(dev)
    rows = []
    for name, dsx_fn, eager_fn, nbytes in cases(a.rows, a.cols, dtype, dev):
        compiled = torch.compile(eager_fn)
        ms = {k: measure_ms(f, warmup=5, iters=a.iters) for k, f in
              (("eager", eager_fn), ("compile", compiled), ("dsx", dsx_fn))}
        gbps = nbytes / ms["dsx"] / 1e6
        rows.append([name, ms["eager"], ms["compile"], ms["dsx"], gbps, f"{100 * gbps / peak:.0f}%",
                     f"{ms['compile'] / ms['dsx']:.2f}x", f"{ms['eager'] / ms['dsx']:.2f}x"])
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}  torch {torch.__version__}  "
          f"shape {a.rows}x{a.cols} {a.dtype}  measured copy peak {peak:.0f} GB/s")
    print(text_table(["kernel", "eager ms", "compile ms", "dsx ms", "dsx GB/s", "% peak", "vs compile", "vs eager"],
                     rows))


if __name__ == "__main__":
    main()
