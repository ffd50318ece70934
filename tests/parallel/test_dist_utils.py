import pytest
import torch
import torch.distributed as dist

from tests.parallel.dist_utils import run_distributed


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_one(rank, world):
    dist.barrier()  # both ranks are connected before either leaves: rank 0 tearing down mid-setup resets rank 1
    if rank == 1:
        raise ValueError("boom")
    return rank


def test_all_reduce_over_two_processes():
    assert run_distributed(_sum_ranks) == [3.0, 3.0]


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*ValueError: boom"):
        run_distributed(_fail_on_one)
