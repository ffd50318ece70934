"""``dsx demo``: optimize two built-in models (GPT-style decoder, ResNet-style CNN) and print a comparison table.

Needs no download; eager vs torch.compile vs dsx.optimize vs torch.compile(backend="dsx"), on CPU or CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dsx.api import optimize
from dsx.core.table import text_table
from dsx.core.timing import compare_ms
from dsx.core.transform import compare_outputs
from dsx.graph.backend import compile_backend
from dsx.graph.fuse import fusions
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm

HEADERS = ["model", "params", "eager ms", "compile ms", "dsx ms", "dsx+compile ms", "speedup", "max abs err",
           "fusions fired"]


def demo_models(device: str) -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    gpt = TinyGPT().eval().to(device)
    cnn = randomize_batchnorm(TinyResNet()).eval().to(device)
    return [("tiny-gpt", gpt, (torch.randint(0, 512, (4, 128), device=device),)),
            ("tiny-resnet", cnn, (torch.randn(8, 3, 32, 32, device=device),))]


def run_demo(*, device: str | None = None, iters: int = 50, progress: bool = True) -> list[list[Any]]:
    """Optimize and time the demo models; return the table rows (also what ``dsx demo`` prints)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, model, inputs in tqdm(demo_models(device), desc="dsx demo", disable=not progress):
        with torch.no_grad():
            reference = model(*inputs)
        opt = optimize(model, inputs)
        compiled = torch.compile(model)
        dsx_compiled = torch.compile(model, backend=compile_backend())
        # Eager-style runs are compared apart from compiled ones: inductor's OpenMP threads keep spinning
        # after compiled code runs and would slow whatever runs next.
        times = {**compare_ms({"eager": lambda: model(*inputs), "dsx": lambda: opt(*inputs)}, warmup=5, iters=iters),
                 **compare_ms({"compile": lambda: compiled(*inputs), "dsx+compile": lambda: dsx_compiled(*inputs)},
                              warmup=5, iters=iters)}
        with torch.no_grad():
            err = max(compare_outputs(reference, opt(*inputs))["max_abs"],
                      compare_outputs(reference, dsx_compiled(*inputs))["max_abs"])
        fired = ", ".join(f"{k}={v}" for k, v in fusions(opt).items() if v) or "none"
        best = min(times["dsx"], times["dsx+compile"])
        rows.append([name, sum(p.numel() for p in model.parameters()), times["eager"], times["compile"],
                     times["dsx"], times["dsx+compile"], f"{times['eager'] / best:.2f}x", err, fired])
    return rows


def main(*, device: str | None = None, iters: int = 50, progress: bool = True) -> None:
    rows = run_demo(device=device, iters=iters, progress=progress)
    print(text_table(HEADERS, rows))
