"""CPU latency of structured channel pruning: a dense ResNet-style CNN vs the same model 50% channel-pruned (l1).
Model: TinyResNet(width=64) on a 32x3x64x64 batch (compute-bound on the CPU). Run: bench_prune.py [--small]
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import dsx
from dsx.core.table import text_table
from dsx.core.timing import compare_ms, cpu_name
from dsx.models import TinyResNet, randomize_batchnorm



def macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass (FlopCounterMode flops / 2)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (the test suite's smoke run)")
    p.add_argument("--amount", type=float, default=0.5, help="fraction of prunable parameters to remove")
    p.add_argument("--round-to", type=int, default=8, help="keep pruned widths multiples of this")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    width, shape = (16, (2, 3, 32, 32)) if a.small else (64, (32, 3, 64, 64))
    x = torch.randn(shape)
    dense = randomize_batchnorm(TinyResNet(width=width)).eval()
    label = f"{a.amount:.0%} channel-pruned (l1, round_to={a.round_to})"
    with tqdm(total=3 if a.no_compile else 5, desc="bench_prune", disable=a.no_progress) as bar:
        pruned = dsx.prune(dense, a.amount, structured=True, example_inputs=x, round_to=a.round_to).eval()
        bar.update()
        models = {"dense fp32": dense, label: pruned}
        groups: dict[str, dict[str, Callable[[], Any]]] = {"eager": {n: (lambda m=m: m(x)) for n, m in models.items()}}
        if not a.no_compile:
            groups["torch.compile"] = {}
            for n, m in models.items():
                compiled = torch.compile(m)
                with torch.inference_mode():
                    compiled(x)  # compile outside the timing
                groups["torch.compile"][n] = lambda c=compiled: c(x)
                bar.update()
        ms: dict[tuple[str, str], float] = {}
        for mode, fns in groups.items():
            ms.update({(mode, n): t for n, t in compare_ms(fns, warmup=2, iters=a.iters).items()})
            bar.update()
    count = {n: (sum(p.numel() for p in m.parameters()), macs(m, x)) for n, m in models.items()}
    rows = []
    for mode in groups:
        for n in models:
            params, mac = count[n]
            speedup = ms[(mode, "dense fp32")] / ms[(mode, n)]
            rows.append([f"{n}, {mode}", f"{params / 1e6:.3f}M", f"{mac / 1e9:.2f}G", ms[(mode, n)],
                         f"{speedup:.2f}x"])
    entry = dsx.history(pruned)[-1]
    print(f"device: cpu ({cpu_name()}, {os.cpu_count()} cores)  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  date {datetime.date.today()}  iters {a.iters}")
    print(f"\nTinyResNet(width={width}), input {list(shape)} fp32, torch.inference_mode(); pruned widths "
          f"{entry['config']['plan']}, {entry['info']['ratio']:.1%} of prunable parameters removed")
    print(text_table(["model", "params", "MACs", "ms", "speedup vs dense (same mode)"], rows))
    print("\nms: median; eager rows and compiled rows are each timed interleaved (compare_ms), apart from each other.")


if __name__ == "__main__":
    main()
