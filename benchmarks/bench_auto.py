"""dsx.optimize's pick against eager, torch.compile, each dsx format by hand and the peers, in one run per model.

Models (from configs, no download): HF BertModel 4 layers d=768 on 16x128 tokens (latency, min row cosine of the
last hidden state), and HF LlamaForCausalLM 8 layers d=1024 GQA (~156M parameters) decoding 32 tokens greedily
from a 32-token prompt with generate() (tokens/s). Run: python benchmarks/bench_auto.py [--models bert,llama]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import dsx
from dsx.core.table import text_table
from dsx.core.timing import compare_ms, cpu_name
from dsx.graph.compiled import is_compiled


def bert(small: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers as T

    d, layers, batch, seq = (64, 2, 2, 16) if small else (768, 4, 16, 128)
    cfg = T.BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(d // 64, 1),
                       intermediate_size=4 * d)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return T.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def llama(small: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers as T

    if small:
        cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=256)
    else:
        cfg = T.LlamaConfig(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                            intermediate_size=2816, vocab_size=32000)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, cfg.vocab_size, (1, 32))}


def torch_ao(model: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def bf16(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def main_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def min_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    a, b = ref.double().flatten(0, -2), out.double().flatten(0, -2)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def ort_session(model: nn.Module, inputs: dict[str, torch.Tensor], tmp: Path) -> Callable[[], Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = dsx.export(model, inputs, tmp / "fp32.onnx").path
    quantize_dynamic(fp32, tmp / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(str(tmp / "int8.onnx"), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return lambda: torch.from_numpy(session.run(None, feeds)[0])


def plans(model: nn.Module, inputs: dict[str, Any], budget: float, budget_s: float) -> dict[str, Callable[[], Any]]:
    q = lambda fmt: dsx.quantize(model, fmt, progress=False)  # noqa: E731
    return {
        "fp32 eager": lambda: model,
        "fp32 torch.compile": lambda: torch.compile(copy.deepcopy(model)),
        "bf16 eager": lambda: bf16(model),
        "torch.ao quantize_dynamic int8": lambda: torch_ao(model),
        "dsx int8": lambda: q("int8"),
        "dsx int8_w7 (7-bit weights)": lambda: q("int8_w7"),
        "dsx int8_weight_only+bf16": lambda: q(dsx.quant.Int8WeightOnly(dtype="bfloat16")),
        'dsx int8 + compile(backend="dsx")': lambda: dsx.Compile()(q("int8")),
        'dsx int8_w7 + compile(backend="dsx")': lambda: dsx.Compile()(q("int8_w7")),
        'dsx int8+bf16 + compile(backend="dsx")': lambda: dsx.Compile()(q(dsx.quant.Int8Dynamic(dtype="bfloat16"))),
        "dsx.optimize (lossless)": lambda: dsx.optimize(model, inputs, progress=False, budget_s=budget_s),
        f"dsx.optimize (max_error={budget:g}, cosine)": lambda: dsx.optimize(
            model, inputs, max_error=budget, metric="cosine", progress=False, budget_s=budget_s),
    }


REPORTS: list[tuple[str, str]] = []
"""(label, report text) of every dsx.optimize search, printed after the tables."""


def bench_bert(small: bool, iters: int, bar: tqdm, tmp: Path, budget_s: float) -> list[list[Any]]:
    model, inputs = bert(small)
    with torch.no_grad():
        ref = main_tensor(model(**inputs))
    built, notes, build_s = {}, {}, {}
    for name, make in plans(model, inputs, 0.01, budget_s).items():
        bar.set_postfix_str(f"bert: {name}")
        t0 = time.perf_counter()
        built[name] = make()
        build_s[name] = time.perf_counter() - t0
        if name.startswith("dsx.optimize"):
            notes[name] = f"picked {dsx.report(built[name]).winner.plan}, search {build_s[name]:.0f} s"
            REPORTS.append((f"bert, {name}", str(dsx.report(built[name]))))
        bar.update()
    fns = {n: (lambda m=m: m(**inputs)) for n, m in built.items()}
    cosine = {}
    with torch.no_grad():
        for n, fn in fns.items():
            cosine[n] = min_cosine(ref, main_tensor(fn()).float())
    eager = {n: f for n, f in fns.items() if not (is_compiled(built[n]) or "torch.compile" in n)}
    compiled = {n: f for n, f in fns.items() if n not in eager}
    ms = {**compare_ms(eager, warmup=2, iters=iters), **compare_ms(compiled, warmup=2, iters=iters)}
    try:
        run = ort_session(model, inputs, tmp)
        with torch.no_grad():
            cosine["onnxruntime quantize_dynamic int8"] = min_cosine(ref, run())
        ms.update(compare_ms({"onnxruntime quantize_dynamic int8": run}, warmup=2, iters=iters))
    except Exception as e:  # a failing peer must not hide the other rows
        notes["onnxruntime quantize_dynamic int8"] = f"{type(e).__name__}: {e}"[:100]
    base = ms["fp32 eager"]
    return [[n, ms.get(n, "-"), f"{base / ms[n]:.2f}x" if n in ms else "-",
             f"{cosine[n]:.5f}" if n in cosine else "-", notes.get(n, "")]
            for n in dict.fromkeys([*fns, *notes, *ms])]


def bench_llama(small: bool, iters: int, bar: tqdm, budget_s: float) -> list[list[Any]]:
    model, inputs = llama(small)
    new = 8 if small else 32
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
        ref_logits = model(**inputs).logits
    built, notes = {}, {}
    for name, make in plans(model, inputs, 0.01, budget_s).items():
        bar.set_postfix_str(f"llama: {name}")
        t0 = time.perf_counter()
        built[name] = make()
        if name.startswith("dsx.optimize"):
            notes[name] = f"picked {dsx.report(built[name]).winner.plan}, search {time.perf_counter() - t0:.0f} s"
            REPORTS.append((f"llama, {name}", str(dsx.report(built[name]))))
        bar.update()
    fns = {n: (lambda m=m: m.generate(**inputs, **gen)) for n, m in built.items()}
    same, cosine = {}, {}
    with torch.no_grad():
        for n, m in built.items():
            same[n] = torch.equal(fns[n](), ref)
            cosine[n] = min_cosine(ref_logits, m(**inputs).logits.float())
    eager = {n: f for n, f in fns.items() if not (is_compiled(built[n]) or "torch.compile" in n)}
    compiled = {n: f for n, f in fns.items() if n not in eager}
    ms = {**compare_ms(eager, warmup=1, iters=iters), **compare_ms(compiled, warmup=1, iters=iters)}
    base = new / ms["fp32 eager"] * 1e3
    return [[n, f"{new / ms[n] * 1e3:.1f}", f"{new / ms[n] * 1e3 / base:.2f}x", f"{cosine[n]:.5f}",
             "yes" if same[n] else "no", notes.get(n, "")] for n in fns]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,llama")
    p.add_argument("--small", action="store_true", help="tiny shapes (the test suite's smoke run)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=900.0, help="budget_s of each dsx.optimize search")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    names = a.models.split(",")
    out = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=10 * len(names), desc="bench_auto",
                                                   disable=a.no_progress) as bar:
        if "bert" in names:
            out.append(("HF BertModel 4 layers d=768, 16x128 tokens" if not a.small else "tiny BERT",
                        ["method", "ms", "vs fp32 eager", "min cosine", "notes"],
                        bench_bert(a.small, a.iters, bar, Path(tmp), a.budget_s)))
        if "llama" in names:
            out.append(("HF LlamaForCausalLM 8 layers d=1024 GQA, batch 1, 32-token prompt, generate() 32 tokens"
                        if not a.small else "tiny Llama generate()",
                        ["method", "tokens/s", "vs fp32 eager", "min cosine (prompt logits)", "same tokens", "notes"],
                        bench_llama(a.small, a.iters, bar, a.budget_s)))
    print(f"device: cpu ({cpu_name()}, {os.cpu_count()} cores)  torch {torch.__version__}  threads "
          f"{torch.get_num_threads()}  date {datetime.date.today()}  iters {a.iters}")
    for label, headers, rows in out:
        print(f"\n{label}")
        print(text_table(headers, rows))
    print("\nmedians; eager-style and compiled rows are each timed interleaved (compare_ms), apart from each other.")
    for label, text in REPORTS:
        print(f"\n{label}: dsx.report\n{text}")


if __name__ == "__main__":
    main()
