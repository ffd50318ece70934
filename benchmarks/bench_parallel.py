"""Compressed DDP gradients: accuracy, traffic and step time of dsx.parallel.comm hooks on 2 gloo CPU processes.
Trains a 64-128-10 MLP on scikit-learn digits per method and seed (each rank on its half). Run: bench_parallel.py
[--small] [--seeds 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from dsx.core.table import text_table
from dsx.core.timing import cpu_name
from dsx.parallel.comm import compress_gradients

# name -> (spec, error_feedback); None: DDP's own fp32 all-reduce, no hook.
METHODS: dict[str, tuple[str | None, bool | None]] = {
    "none (fp32 all-reduce)": (None, None),
    "fp16": ("fp16", None),
    "int8": ("int8", None),
    "int8 + error feedback": ("int8", True),
    "topk:0.01 (error feedback)": ("topk:0.01", None),
    "powersgd:rank=4": ("powersgd:rank=4", None),
    "topk:0.01,bits=4 (error feedback)": ("topk:0.01,bits=4", None),
    "2:4 fp16 (error feedback)": ("2:4", None),
}
BATCH, LR = 32, 0.05


def digits(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """This rank's share of a fixed 75/25 stratified split, the same number of samples on every rank; the test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    n = len(x_train) // world * world
    f, i = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.long))
    return f(x_train[rank:n:world]), i(y_train[rank:n:world]), f(x_test), i(y_test)


def train(rank: int, world: int, spec: str | None, error_feedback: bool | None, epochs: int, seed: int,
          bar: Any) -> tuple[float, int, float, float]:
    """One run: test accuracy, gradient bytes sent by this rank, ratio to fp32 all-reduce, mean step seconds."""
    torch.manual_seed(seed)
    x, y, x_test, y_test = digits(rank, world)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    stats = compress_gradients(model, spec, error_feedback=error_feedback) if spec else None
    steps = epochs * math.ceil(len(x) / BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    order = torch.Generator().manual_seed(seed + 1)
    step_s = 0.0
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(BATCH):
            start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            step_s += time.perf_counter() - start
            schedule.step()
        bar.update()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    numel = sum(p.numel() for p in model.parameters())
    fp32_bytes = 2 * (world - 1) * 4 * numel // world * steps  # ring all-reduce, as CommStats counts it
    return accuracy, stats.bytes_sent if stats else fp32_bytes, stats.ratio if stats else 1.0, step_s / steps


def points(x: float) -> str:
    """Percentage points with a sign, never "-0.00"."""
    return f"{round(x, 2) + 0.0:+.2f}"


def rows(runs: dict[str, list[tuple[float, int, float, float]]]) -> list[list[Any]]:
    """One table row per method from its runs (one per seed): mean accuracy, its mean and worst-seed difference to
    the first method's accuracy on the same seed, MB sent, ratio, mean step ms."""
    base = [run[0] for run in next(iter(runs.values()))]
    table = []
    for name, seeds in runs.items():
        accuracy = [run[0] for run in seeds]
        gaps = [(a - b) * 100 for a, b in zip(accuracy, base)]
        step_ms = sum(run[3] for run in seeds) / len(seeds) * 1e3
        gap = f"{points(sum(gaps) / len(gaps))} / {points(min(gaps))}"
        mean = sum(accuracy) / len(accuracy)
        table.append([name, f"{mean:.2%}", gap, f"{seeds[0][1] / 1e6:.3f}", f"{seeds[0][2]:.2f}x", step_ms])
    return table


def worker(rank: int, world: int, port: int, epochs: int, seeds: int, progress: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which os._exit below would leak
    try:
        total = len(METHODS) * seeds * epochs
        with tqdm(total=total, desc="bench_parallel", disable=bool(rank) or not progress) as bar:
            runs = {}
            for name, (spec, error_feedback) in METHODS.items():
                bar.set_postfix_str(name)
                runs[name] = [train(rank, world, spec, error_feedback, epochs, seed, bar) for seed in range(seeds)]
        if rank == 0:
            Path(out).write_text(json.dumps(rows(runs)))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with torch 2.13, DDP on gloo aborts in exit-time destructors in about 1 run of 6
    # (std::terminate), which mp.spawn reports as a failure although the work is done.
    os._exit(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="2 epochs, 1 seed (the test suite's smoke run)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, default=4, help="runs per method (initialization and batch order)")
    p.add_argument("--world", type=int, default=2, help="gloo processes")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    epochs, seeds = (2, 1) if a.small else (a.epochs, a.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        mp.spawn(worker, args=(a.world, free_port(), epochs, seeds, not a.no_progress, str(out)), nprocs=a.world)
        table = json.loads(out.read_text())
    print(f"device: cpu ({cpu_name()}, {os.cpu_count()} cores)  torch {torch.__version__}  gloo, {a.world} processes "
          f"x 1 thread  date {datetime.date.today()}  epochs {epochs}  seeds {seeds}")
    print(f"\ndigits MLP 64-128-10 (9610 parameters, one DDP bucket), batch {BATCH} per rank, SGD momentum 0.9, "
          f"lr {LR} decaying linearly to 0")
    print(text_table(["method", "test accuracy (mean)", "vs fp32 pt (mean / worst seed)", "gradient MB sent per rank",
                      "vs fp32 all-reduce", "mean step ms"], table))
    print("\npt: test accuracy minus fp32 all-reduce's on the same seed, in percentage points (mean over seeds / "
          "lowest seed).\nMB: what rank 0 sent for gradients under the ring model (all-reduce of B bytes: 2(N-1)B/N; "
          "all-gather: (N-1)B per rank);\npowersgd all-reduces uncompressed for its first 10 steps. Step ms: forward, "
          "backward (with the hook's communication) and optimizer step.")


if __name__ == "__main__":
    main()
