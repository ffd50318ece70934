"""Decode and prefill speed of a Hugging Face Llama at batch 1 (greedy ``generate()`` tokens/s, one prompt's forward)
for fp32 / bf16 eager, each dsx weight format (eager, compiled, with the int8 KV cache) and the peers (torch.ao
quantize_dynamic, torchao), with weight and KV-cache sizes. Run: bench_generate.py [--small] [--tokens N]
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
from dsx.kernels import int8_linear_cpu
from dsx.quant import Int4WeightOnly
from dsx.quant.linear import QuantLinear
from dsx.quant.quantize import state_bytes

KV_RESIDUAL = 16
"""Tokens the int8 KV cache keeps in float (the rest are int8 codes)."""
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


def compiled(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    """``model`` through ``dsx.Compile`` (the dsx backend, the model keeping its class and ``generate()``)."""
    return dsx.Compile()(model, ids)


def kv_int8(model: nn.Module) -> nn.Module:
    """``model`` generating with dsx's int8 KV cache, all but the newest 16 tokens quantized."""
    dsx.quant.use_quantized_cache(model, "int8", residual_length=KV_RESIDUAL)
    return model


def variants(model: nn.Module, ids: torch.Tensor) -> dict[str, Callable[[], nn.Module]]:
    """Row label -> a builder of the model to time (built only for the rows asked for; all of them are then held at
    once, to be timed interleaved)."""
    bf16 = torch.bfloat16
    rows: dict[str, Callable[[], nn.Module]] = {
        "fp32 eager": lambda: model,
        "bf16 eager": lambda: copy.deepcopy(model).to(bf16),
        "dsx int8": lambda: dsx.quantize(model, "int8", progress=False),
        "dsx int8_w7": lambda: dsx.quantize(model, "int8_w7", progress=False),
        "dsx int8 + compile": lambda: compiled(dsx.quantize(model, "int8", progress=False), ids),
        "dsx int8_w7 + compile": lambda: compiled(dsx.quantize(model, "int8_w7", progress=False), ids),
        "dsx int8_w7 + int8 KV cache": lambda: kv_int8(dsx.quantize(model, "int8_w7", progress=False)),
        "dsx int8_weight_only (fp32)": lambda: dsx.quantize(model, "int8_weight_only", progress=False),
        "dsx int8_weight_only (bf16)": lambda: dsx.quantize(model, "int8_weight_only", progress=False).to(bf16),
        "dsx int4_weight_only hqq g128 (fp32)": lambda: dsx.quantize(model, Int4WeightOnly(), progress=False),
        "dsx int4_weight_only hqq g128 (bf16)": lambda: dsx.quantize(model, Int4WeightOnly(), progress=False).to(bf16),
        "dsx int4_weight_only hqq g128 (fp32) + compile": lambda: compiled(
            dsx.quantize(model, Int4WeightOnly(), progress=False), ids),
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


def prefill_s(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one forward over the prompt ``ids``, filling a fresh KV cache."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids, use_cache=True)
    return time.perf_counter() - t0


def weights_mb(model: nn.Module) -> float:
    """MB of the model's parameters and buffers plus the packed weight copies its kernels hold beside them (dsx's
    fbgemm packs, torch.ao's packed params)."""
    weights = [getattr(m, "weight", None) for m in model.modules() if isinstance(m, QuantLinear)]
    packed = sum(w.numel() for w in weights if w is not None and id(w) in int8_linear_cpu._PACKS)
    packed += sum(m.weight().numel() + (0 if m.bias() is None else m.bias().numel() * 4) for m in model.modules()
                  if isinstance(m, torch.ao.nn.quantized.dynamic.Linear))
    return (state_bytes(model) + packed) / 2**20


def kv_cache_mb(model: nn.Module, context: int) -> float:
    """MB of the KV cache ``model`` generates with, holding ``context`` tokens (of batch 1)."""
    from transformers import DynamicCache

    config = model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    kind = getattr(model, "dsx_kv_cache", None)
    cache = (dsx.quant.QuantizedCache(config, kind, residual_length=KV_RESIDUAL) if kind else
             DynamicCache(config=config))
    dtype = next(model.parameters()).dtype
    for layer in range(config.num_hidden_layers):
        kv = torch.randn(2, 1, heads, context, dim, dtype=dtype if dtype.is_floating_point else torch.float32)
        cache.update(kv[0], kv[1], layer)
    return dsx.quant.cache_bytes(cache) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a 2-layer model (smoke run)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generate() call")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length of the generate() calls")
    parser.add_argument("--prefill", type=int, default=128, help="prompt length of the timed prefill forward")
    parser.add_argument("--context", type=int, default=2048, help="context at which the KV cache size is given")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds: one generate() call per row each")
    parser.add_argument("--rows", default="", help="comma-separated substrings: run only matching rows")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    model = llama("small" if args.small else "full")
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    long = torch.randint(1, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    results: dict[str, list[str]] = {}
    base, ref = None, None
    wanted = [r for r in args.rows.split(",") if r]
    rows = {k: v for k, v in variants(model, ids).items() if not wanted or any(w in k for w in wanted)}
    built: dict[str, nn.Module] = {}
    tokens: dict[str, torch.Tensor] = {}
    for label, make in tqdm(rows.items(), desc="bench_generate: build + warm up", disable=args.no_progress):
        try:
            built[label] = make()
        except Exception as err:  # a peer that is not installed or does not run here is reported, not fatal
            results[label] = [label, f"n/a ({type(err).__name__}: {str(err)[:60]})"] + [""] * 6
            continue
        tokens[label] = generate_s(built[label], ids, args.tokens)[1]
        prefill_s(built[label], long)
    seconds: dict[str, list[float]] = {label: [] for label in built}
    prefill: dict[str, list[float]] = {label: [] for label in built}
    for _ in tqdm(range(args.repeats), desc="bench_generate: timed rounds", disable=args.no_progress):
        for label, model_ in built.items():  # interleaved: a drifting machine slows every row alike
            seconds[label].append(generate_s(model_, ids, args.tokens)[0])
            prefill[label].append(prefill_s(model_, long))
    for label, times in seconds.items():
        tps = args.tokens / statistics.median(times)
        base = tps if base is None else base
        ref = tokens[label] if ref is None else ref
        agree = (tokens[label][0, args.prompt:] == ref[0, args.prompt:]).float().mean().item()
        spread = (max(times) - min(times)) / statistics.median(times)
        results[label] = [label, f"{tps:.1f}", f"{tps / base:.2f}x", f"{spread:.0%}",
                          f"{args.prefill / statistics.median(prefill[label]):.0f}",
                          f"{weights_mb(built[label]):.4g}", f"{kv_cache_mb(built[label], args.context):.4g}",
                          f"{agree:.2f}"]
    table = [results[label] for label in rows]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{datetime.date.today()}")
    print(f"LlamaForCausalLM {params:.0f}M params, batch 1, prompt {args.prompt}, {args.tokens} new tokens (greedy)")
    print(text_table(["variant", "decode tokens/s", "vs fp32 eager", "spread", f"prefill tokens/s ({args.prefill})",
                      "weights MB (with packed copies)", f"KV cache MB ({args.context} tokens)",
                      "greedy tokens = fp32"], table))
    print(f"median of {args.repeats} rounds, each timing one generate() call and one {args.prefill}-token prefill "
          f"forward of every row, interleaved; the int8 KV cache keeps the newest {KV_RESIDUAL} tokens in float")


if __name__ == "__main__":
    main()
