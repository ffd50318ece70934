"""Decode speed of a Hugging Face Llama: tokens/s of greedy ``generate()`` at batch 1 for fp32 / bf16 eager, each
dsx weight format and the peers (torch.ao quantize_dynamic, torchao). Run: bench_generate.py [--small] [--tokens N]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import dsx
from dsx.core.table import text_table
from dsx.core.timing import cpu_name
from dsx.quant import Int4WeightOnly

SIZES = {  # the issue's ~156M model, and a tiny one for smoke runs
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}


def llama(size: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES[size])).eval()


def torch_ao(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def torchao(model: nn.Module, bits: int, dtype: torch.dtype) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(model).to(dtype)
    quantize_(m, Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=128,
                                                                                int4_packing_format="opaque"))
    return m


def variants(model: nn.Module) -> dict[str, Callable[[], nn.Module]]:
    """Row label -> a builder of the model to time (built only for the rows asked for; all of them are then held at
    once, to be timed interleaved)."""
    bf16 = torch.bfloat16
    rows: dict[str, Callable[[], nn.Module]] = {
        "fp32 eager": lambda: model,
        "bf16 eager": lambda: copy.deepcopy(model).to(bf16),
        "dsx int8": lambda: dsx.quantize(model, "int8", progress=False),
        "dsx int8_w7": lambda: dsx.quantize(model, "int8_w7", progress=False),
        "dsx int8_weight_only (fp32)": lambda: dsx.quantize(model, "int8_weight_only", progress=False),
        "dsx int8_weight_only (bf16)": lambda: dsx.quantize(model, "int8_weight_only", progress=False).to(bf16),
        "dsx int4_weight_only hqq g128 (fp32)": lambda: dsx.quantize(model, Int4WeightOnly(), progress=False),
        "dsx int4_weight_only hqq g128 (bf16)": lambda: dsx.quantize(model, Int4WeightOnly(), progress=False).to(bf16),
        "torch.ao quantize_dynamic (fbgemm)": lambda: torch_ao(model),
        "torchao Int8WeightOnly (bf16)": lambda: torchao(model, 8, bf16),
        "torchao Int4WeightOnly g128 (bf16)": lambda: torchao(model, 4, bf16),
    }
    return rows


def generate_s(model: nn.Module, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy ``generate()`` of ``new`` tokens, and its tokens."""
    kw: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a 2-layer model (smoke run)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generate() call")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds: one generate() call per row each")
    parser.add_argument("--rows", default="", help="comma-separated substrings: run only matching rows")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    model = llama("small" if args.small else "full")
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    results: dict[str, list[str]] = {}
    base, ref = None, None
    wanted = [r for r in args.rows.split(",") if r]
    rows = {k: v for k, v in variants(model).items() if not wanted or any(w in k for w in wanted)}
    built: dict[str, nn.Module] = {}
    tokens: dict[str, torch.Tensor] = {}
    for label, make in tqdm(rows.items(), desc="bench_generate: build + warm up", disable=args.no_progress):
        try:
            built[label] = make()
        except Exception as err:  # a peer that is not installed or does not run here is reported, not fatal
            results[label] = [label, f"n/a ({type(err).__name__}: {str(err)[:60]})", "", "", ""]
            continue
        tokens[label] = generate_s(built[label], ids, args.tokens)[1]
    seconds: dict[str, list[float]] = {label: [] for label in built}
    for _ in tqdm(range(args.repeats), desc="bench_generate: timed rounds", disable=args.no_progress):
        for label, model_ in built.items():  # interleaved: a drifting machine slows every row alike
            seconds[label].append(generate_s(model_, ids, args.tokens)[0])
    for label, times in seconds.items():
        tps = args.tokens / statistics.median(times)
        base = tps if base is None else base
        ref = tokens[label] if ref is None else ref
        agree = (tokens[label][0, args.prompt:] == ref[0, args.prompt:]).float().mean().item()
        spread = (max(times) - min(times)) / statistics.median(times)
        results[label] = [label, f"{tps:.1f}", f"{tps / base:.2f}x", f"{spread:.0%}", f"{agree:.2f}"]
    table = [results[label] for label in rows]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{datetime.date.today()}")
    print(f"LlamaForCausalLM {params:.0f}M params, batch 1, prompt {args.prompt}, {args.tokens} new tokens (greedy)")
    print(text_table(["variant", "tokens/s", "vs fp32 eager", "spread", "greedy tokens = fp32"], table))
    print(f"median of {args.repeats} generate() calls per row, the rows timed interleaved round by round")


if __name__ == "__main__":
    main()
