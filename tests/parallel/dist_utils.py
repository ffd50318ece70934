"""Run a function on 2 (or N) gloo processes on this machine: a free loopback port, a timeout on every collective,
teardown whatever happens, and each rank's return value (or its exception) back in the test process."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60
"""Every collective of a test process group fails after this long instead of hanging."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        # Pickled here: a queued tensor would share memory with a process that may exit before it is read.
        result = (rank, True, pickle.dumps(fn(rank, world, *args)))
    except BaseException:
        result = (rank, False, traceback.format_exc())
    queue.put(result)
    # Flush the result into the pipe before teardown: torch's gloo teardown can abort the process, and a message
    # cut short would leave the parent blocked in the middle of reading it.
    queue.close()
    queue.join_thread()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 180) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each in its own process with a gloo group initialized.

    ``fn`` must be a module-level function (it is pickled into spawned processes) and return picklable values
    (tensors are fine). A rank that raises fails the call with its traceback; past ``timeout`` seconds every rank
    is killed and ``TimeoutError`` raised.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    except Exception as e:
        if type(e).__name__ == "Empty":
            raise TimeoutError(f"distributed test did not finish in {timeout} s") from None
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
