"""``dsx demo``: ``dsx.optimize``'s search on built-in models (a GPT-style decoder, a ResNet-style CNN and, with
transformers installed, a small Hugging Face Llama decoding with ``generate()``): a lossless and a lossy row each.

Needs no download; each search is bounded by ``budget_s`` so the whole demo stays short on a laptop CPU.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from dsx.api import optimize
from dsx.core.report import REPORT_ATTR, Report
from dsx.core.table import text_table
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm

HEADERS = ["model", "search", "picked", "speed-up", "error", "plans tried", "search s", "check"]
LOSSY = {"max_error": 0.01, "metric": "cosine"}


def demo_models(device: str) -> list[tuple[str, nn.Module, Any]]:
    torch.manual_seed(0)
    models: list[tuple[str, nn.Module, Any]] = [
        ("tiny-gpt", TinyGPT().eval().to(device), torch.randint(0, 512, (4, 128), device=device)),
        ("tiny-resnet", randomize_batchnorm(TinyResNet()).eval().to(device), torch.randn(8, 3, 32, 32, device=device)),
    ]
    if importlib.util.find_spec("transformers") is not None:
        import transformers as T

        cfg = T.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=688, vocab_size=2048)
        llama = T.LlamaForCausalLM(cfg).eval().to(device)
        models.append(("hf-llama generate()", llama, {"input_ids": torch.randint(0, 2048, (1, 16), device=device)}))
    return models


def _check(name: str, model: nn.Module, result: nn.Module, inputs: Any) -> str:
    """A drop-in check on a new shape: generate()'s tokens (decoder) or the output on another batch size."""
    if name.startswith("hf-"):
        ids = inputs["input_ids"][:, :9]
        same = torch.equal(*(m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in
                             (model, result)))
        return "generate() tokens " + ("identical" if same else "differ")
    x = inputs[:1]
    with torch.no_grad():
        ok = type(result) is type(model) and result(x).shape == model(x).shape
    return f"batch 1: {'ok' if ok else 'FAILED'}"


def run_demo(*, device: str | None = None, budget_s: float = 4.0, progress: bool = True) -> list[list[Any]]:
    """Run the lossless and the lossy search on each demo model; return the table rows ``dsx demo`` prints."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    models = demo_models(device)
    with tqdm(total=2 * len(models), desc="dsx demo", disable=not progress) as bar:
        for name, model, inputs in models:
            for label, kwargs in (("lossless", {}), ("cosine <= 0.01", LOSSY)):
                # Compiling costs tens of seconds per plan on a laptop CPU: the demo compiles only the small models'
                # lossless plan, so it stays within a minute (dsx.optimize compiles every plan by default).
                compiled = label == "lossless" and not name.startswith("hf-")
                start = time.perf_counter()
                result = optimize(model, inputs, budget_s=budget_s, compile=compiled, progress=False, **kwargs)
                spent = time.perf_counter() - start
                rep = Report.from_dict(getattr(result, REPORT_ATTR))
                win = rep.winner
                tried = sum(r.status != "not tried: budget_s spent" for r in rep.rows) - 1
                rows.append([name, label, win.plan, f"{win.speedup:.2f}x", win.error, tried, f"{spent:.0f}",
                             _check(name, model, result, inputs)])
                bar.update()
    return rows


def main(*, device: str | None = None, budget_s: float = 4.0, progress: bool = True) -> None:
    rows = run_demo(device=device, budget_s=budget_s, progress=progress)
    print(text_table(HEADERS, rows))
    print("\nEach row is one dsx.optimize call: it built, verified and timed candidate plans on this machine and kept "
          "the fastest\nwithin the budget (lossless: max_rel 1e-4), never slower than the original. dsx.report(result)"
          " lists every plan.")
