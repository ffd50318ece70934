"""End-to-end latency of the graph passes: eager vs torch.compile vs dsx.Fuse vs torch.compile(backend="dsx").

Models: the built-in tiny GPT and ResNet, and Hugging Face BERT / Llama built from configs (no download).
Run: python benchmarks/bench_optimize.py [--device cpu|cuda] [--models gpt,resnet,bert,llama]
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

import dsx
from dsx.core.table import text_table
from dsx.core.timing import compare_ms
from dsx.core.transform import compare_outputs
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm


def build(name: str, dev: str):
    torch.manual_seed(0)
    if name == "gpt":
        return TinyGPT(vocab=4096, dim=256, layers=4, heads=8, max_len=256), (torch.randint(0, 4096, (8, 256)),), {}
    if name == "resnet":
        return randomize_batchnorm(TinyResNet(width=64)), (torch.randn(16, 3, 64, 64),), {}
    import transformers as T

    if name == "bert":
        cfg = T.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                           attn_implementation="eager")
        ids = torch.randint(0, cfg.vocab_size, (8, 128))
        return T.BertModel(cfg), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                            intermediate_size=688, vocab_size=4096, attn_implementation="eager")
        return T.LlamaModel(cfg), (), {"input_ids": torch.randint(0, 4096, (8, 128)), "use_cache": False}
    raise SystemExit(f"unknown model {name!r}: choose from gpt, resnet, bert, llama")


def to(x, dev: str):
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="gpt,resnet,bert,llama")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    rows = []
    for name in tqdm(a.models.split(","), desc="bench_optimize", disable=a.no_progress):
        model, args, kwargs = build(name, a.device)
        model = model.eval().to(a.device)
        args = tuple(to(x, a.device) for x in args)
        kwargs = {k: to(v, a.device) for k, v in kwargs.items()}
        with torch.no_grad():
            ref = model(*args, **kwargs)
        opt = dsx.Fuse()(model, kwargs if kwargs else args)  # the shape-specialized graph (bench_auto: the search)
        torch._dynamo.reset()
        compiled, dsx_compiled = torch.compile(model), torch.compile(model, backend=dsx.compile_backend())
        # eager-style and compiled runs are compared apart: inductor's OpenMP threads spin after compiled code
        ms = {**compare_ms({"eager": lambda: model(*args, **kwargs), "dsx": lambda: opt(*args, **kwargs)},
                           warmup=3, iters=a.iters),
              **compare_ms({"compile": lambda: compiled(*args, **kwargs),
                            "dsx+compile": lambda: dsx_compiled(*args, **kwargs)}, warmup=3, iters=a.iters)}
        with torch.no_grad():
            err = compare_outputs(ref, opt(*args, **kwargs))["max_rel"]
        rows.append([name, ms["eager"], ms["compile"], ms["dsx"], ms["dsx+compile"],
                     f"{ms['eager'] / ms['dsx']:.2f}x", f"{ms['compile'] / ms['dsx+compile']:.2f}x", err,
                     ", ".join(f"{k}={v}" for k, v in dsx.fusions(opt).items() if v)])
    print(f"device: {a.device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(text_table(["model", "eager ms", "compile ms", "dsx.Fuse ms", "dsx+compile ms", "dsx.Fuse vs eager",
                      "dsx+compile vs compile", "max rel err", "fusions"], rows))


if __name__ == "__main__":
    main()
