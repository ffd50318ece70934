"""Tiny byte-level Llama (1.9M params) pretrained on Python stdlib docstrings: a real LM for quantization accuracy.
Rebuild: python benchmarks/tiny_lm.py --out tests/fixtures/tiny_llama (~6 min, 2 threads); --eval DIR: perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import math
import pkgutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_llama"
VOCAB = 256  # token id == byte value; no special tokens are added to the text
BOS_ID = EOS_ID = 0  # NUL never occurs in the corpus; the config names it bos/eos so generate() has an id to use
HELDOUT_EVERY = 20  # every 20th docstring goes to the held-out split, never to training
HELDOUT_MAX_BYTES = 64_000
SKIP = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
        "pydoc_data", "__main__", "__hello__", "__phello__"}
PROMPTS = ["Return the number of", "This module provides", "The default value is", "Raise ValueError if the",
           "Create a new"]


def _import(name: str) -> ModuleType | None:
    """Import a module quietly (no warnings, no output); None if it fails."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - platform-only modules raise anything, even SystemExit
        return None


def _module_names() -> list[str]:
    """Public stdlib modules and their public submodules (sorted, without SKIP), that import on this platform."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP or (mod := _import(top)) is None:
            continue
        names.append(top)
        if hasattr(mod, "__path__"):
            subs = pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda _: None)
            names += sorted(s.name for s in subs if not any(p in SKIP or p.startswith("_")
                                                            for p in s.name.split(".")[1:]))
    return names


def docstrings() -> list[str]:
    """The docstrings of the stdlib's modules, classes, methods and functions, in a fixed order.
    Returns:
        Distinct docstrings of >= 20 characters, ASCII-only, each with its whitespace collapsed to single spaces.
    """
    docs: list[str] = []
    seen: set[str] = set()

    def add(obj: object) -> None:
        try:
            doc = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001
            return
        doc = " ".join((doc or "").encode("ascii", "ignore").decode().split())
        if len(doc) >= 20 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in _module_names():
        if (mod := _import(name)) is None:
            continue
        add(mod)
        for _, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj):
                add(obj)
                for _, member in sorted(vars(obj).items()):
                    if isinstance(member, (classmethod, staticmethod)):
                        add(member.__func__)
                    elif inspect.isfunction(member) or inspect.ismethoddescriptor(member) \
                            or isinstance(member, property):
                        add(member)
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                add(obj)
    return docs


def corpus() -> str:
    """All stdlib docstrings, one per line (~1.4 MB on CPython 3.11).
    Returns:
        The ASCII text, docstrings joined by newlines.
    """
    return "\n".join(docstrings())


def split(docs: list[str]) -> tuple[str, str]:
    """Deterministic train / held-out split: every HELDOUT_EVERY-th docstring is held out.

    Args:
        docs: the docstrings, as from docstrings().
    Returns:
        (train text, held-out text); the held-out text is cut at a docstring boundary to <= HELDOUT_MAX_BYTES.
    """
    train = "\n".join(d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1)
    held, size = [], 0
    for d in docs[HELDOUT_EVERY - 1::HELDOUT_EVERY]:
        if size + len(d) + 1 > HELDOUT_MAX_BYTES:
            break
        held.append(d)
        size += len(d) + 1
    return train, "\n".join(held) + "\n"


def encode(text: str) -> torch.Tensor:
    """Byte-level tokenizer: one token per byte (non-ASCII characters are dropped).

    Args:
        text: the text.
    Returns:
        1-D int64 tensor of byte values in [0, 256).
    """
    return torch.frombuffer(bytearray(text.encode("ascii", "ignore")), dtype=torch.uint8).long()


def decode(ids: torch.Tensor | list[int]) -> str:
    """Inverse of encode(); BOS/EOS (0) tokens are dropped, bytes >= 128 become U+FFFD.

    Args:
        ids: token ids.
    Returns:
        The decoded text.
    """
    ids = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(i for i in ids if i != BOS_ID).decode("ascii", "replace")


def config(layers: int = 3, hidden: int = 256, intermediate: int = 512):
    """The fixture's LlamaConfig: 8 heads / 4 KV heads, vocab 256, untied lm_head; 32/64/128 divide all in_features.

    Args:
        layers: decoder layers. hidden: hidden size. intermediate: MLP size.
    Returns:
        A transformers LlamaConfig.
    """
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of any model returning `.logits`, a tuple (logits first) or a tensor."""
    out = model(x, use_cache=False) if hasattr(model, "generation_config") else model(x)
    out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    return out.float()


@torch.no_grad()
def perplexity(model: nn.Module, text_or_ids: str | torch.Tensor, seq_len: int = 256, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 16, progress: bool = False) -> float:
    """Byte-level perplexity: exp of the mean next-token NLL, each target scored once, windows batched.

    Args:
        model: a causal LM (e.g. the fixture, quantized or not) mapping (B, T) ids to (B, T, 256) logits.
        text_or_ids: text (encoded with encode()) or a tensor of token ids.
        seq_len: the model's context per window. stride: step between windows (default seq_len: no overlap;
            smaller strides give each target more context).
        max_tokens: use only the first max_tokens ids. batch_size: windows per forward. progress: show a tqdm bar.
    Returns:
        The perplexity (1 = perfect, 256 = uniform over bytes).
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len or batch_size < 1:
        raise ValueError(f"need seq_len >= 1, 1 <= stride <= seq_len, batch_size >= 1; got {seq_len}, {stride}, "
                         f"{batch_size}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {limit}")
    ids = encode(text_or_ids) if isinstance(text_or_ids, str) else torch.as_tensor(text_or_ids).flatten().long()
    ids = ids[:max_tokens] if max_tokens is not None else ids
    n = ids.numel() - 1  # targets
    if n < 1:
        raise ValueError("need at least 2 tokens to measure perplexity")
    length = min(seq_len, n)
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] + length < n:
        starts.append(n - length)  # a last window aligned to the end scores the tail
    first = [0] + [max(0, prev + length - s) for prev, s in zip(starts, starts[1:])]  # first unscored position
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batches = range(0, len(starts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="perplexity")
    nll, count = 0.0, 0
    for b in batches:
        idx = torch.tensor(starts[b:b + batch_size])[:, None] + torch.arange(length + 1)
        win = ids[idx].to(device)
        logp = F.log_softmax(_logits(model, win[:, :-1]), dim=-1)
        tok = -logp.gather(-1, win[:, 1:, None])[..., 0]
        mask = torch.arange(length, device=device) >= torch.tensor(first[b:b + batch_size], device=device)[:, None]
        nll += tok[mask].double().sum().item()
        count += int(mask.sum())
    return math.exp(nll / count)


@torch.no_grad()
def generate(model: nn.Module, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation without a KV cache (works for any model that perplexity() accepts).

    Args:
        model: the causal LM. prompt: the prompt text. max_new_tokens: bytes to generate.
    Returns:
        The generated continuation only (without the prompt).
    """
    param = next(model.parameters(), None)
    ids = encode(prompt)[None].to(param.device if param is not None else "cpu")
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, _logits(model, ids[:, -256:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decode(ids[0, len(prompt):])


def train(text: str, heldout: str = "", steps: int = 900, seed: int = 0, minutes: float | None = None,
          batch_size: int = 16, seq_len: int = 256, lr: float = 3e-3, threads: int = 2, bf16: bool = True,
          log_every: int = 100) -> nn.Module:
    """Train the fixture LM: AdamW, linear warmup + cosine decay, random windows of the training bytes.

    The same seed, threads and machine give the same weights; bit-exactness across CPUs/library versions is not
    guaranteed (oneDNN/BLAS kernels differ). A `minutes` cap that triggers also breaks reproducibility.

    Args:
        text: training text. heldout: held-out text for logging perplexity ("" skips it). steps: optimizer steps.
        seed: the RNG seed (init and data order). minutes: optional wall-clock cap. batch_size, seq_len: the batch.
        lr: peak learning rate. threads: torch threads. bf16: bf16 autocast (fp32 master weights). log_every: steps.
    Returns:
        The trained LlamaForCausalLM in eval mode (fp32).
    """
    from transformers import LlamaForCausalLM
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config()).train()
    data = encode(text)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, data.numel() - seq_len - 1, (batch_size, 1), generator=gen) + torch.arange(seq_len + 1)
        batch = data[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = step == steps - 1 or (minutes is not None and time.time() - t0 > 60 * minutes)
        if (step + 1) % log_every == 0 or last:
            ppl = perplexity(model.eval(), heldout, max_tokens=8192) if heldout else float("nan")
            model.train()
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}  held-out ppl(8K) {ppl:.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
        if last:
            if step < steps - 1:
                print(f"stopped at the {minutes} min cap: the weights are not reproducible", flush=True)
            break
    return model.eval()


def build(out: str | Path = FIXTURE, **train_kwargs: object) -> nn.Module:
    """Build the fixture folder: config.json, model.safetensors (fp32), heldout.txt, prompts.txt.

    Args:
        out: the output folder. train_kwargs: passed to train() (steps, seed, minutes, ...).
    Returns:
        The trained model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, heldout = split(docstrings())
    print(f"corpus: {len(train_text):,} train bytes, {len(heldout):,} held-out bytes", flush=True)
    (out / "heldout.txt").write_text(heldout)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    model = train(train_text, heldout, **train_kwargs)
    model.save_pretrained(out)
    return model


def load(path: str | Path = FIXTURE) -> nn.Module:
    """Load the fixture model (safetensors only) in eval mode; encode()/decode() are its tokenizer.

    Args:
        path: the fixture folder.
    Returns:
        The LlamaForCausalLM (fp32, eval mode).
    """
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32).eval()


def heldout_text(path: str | Path = FIXTURE) -> str:
    """The fixture's held-out text (not seen in training).

    Args:
        path: the fixture folder.
    Returns:
        The text of heldout.txt.
    """
    return (Path(path) / "heldout.txt").read_text()


def prompts(path: str | Path = FIXTURE) -> list[str]:
    """The fixture's generation prompts.

    Args:
        path: the fixture folder.
    Returns:
        The non-empty lines of prompts.txt.
    """
    return [line for line in (Path(path) / "prompts.txt").read_text().splitlines() if line]


def main() -> None:
    """Command line: --out DIR builds the fixture, --eval DIR prints its held-out perplexity."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="build the fixture into this folder")
    ap.add_argument("--eval", help="print the held-out perplexity of the fixture in this folder")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock cap (an early stop is not reproducible)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.out or args.eval):
        ap.error("give --out DIR and/or --eval DIR")
    if args.out:
        t0 = time.time()
        build(args.out, steps=args.steps, seed=args.seed, minutes=args.minutes, threads=args.threads)
        print(f"built {args.out} in {time.time() - t0:.0f}s")
    if args.eval:
        torch.set_num_threads(args.threads)
        model, t0 = load(args.eval), time.time()
        ppl = perplexity(model, heldout_text(args.eval))
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.eval}: {n:,} params, held-out byte perplexity {ppl:.4f} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
