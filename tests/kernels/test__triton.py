import pytest

from dsx.kernels._triton import interpreting, next_pow2, prune_for_interpreter


@pytest.mark.parametrize("n,want", [(1, 1), (3, 4), (64, 64), (65, 128)])
def test_next_pow2(n, want):
    assert next_pow2(n) == want


def test_prune_keeps_one_config_only_when_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting() and prune_for_interpreter([1, 2, 3], {}) == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting() and prune_for_interpreter([1, 2, 3], {}) == [1, 2, 3]
