import pytest

from dsx.kernels._triton import ROW_CONFIGS, interpreting, next_pow2, prune_for_interpreter, prune_row_configs


@pytest.mark.parametrize("n,want", [(1, 1), (3, 4), (64, 64), (65, 128)])
def test_next_pow2(n, want):
    assert next_pow2(n) == want


def test_prune_keeps_one_config_only_when_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting() and prune_for_interpreter([1, 2, 3], {}) == [1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting() and prune_for_interpreter([1, 2, 3], {}) == [1, 2, 3]


@pytest.mark.parametrize("block,warps", [
    (65536, [16]),          # one warp here took minutes to compile
    (16384, [8, 16]),
    (1024, [4, 1, 2, 8, 16]),
    (64, [1, 2]),
    (16, [1]),              # fewer elements than one warp's threads: the nearest config
])
def test_row_configs_keep_the_warps_that_fit_the_block(monkeypatch, block, warps):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert [c.num_warps for c in prune_row_configs(ROW_CONFIGS, {}, BLOCK=block)] == warps
    assert [c.num_warps for c in prune_row_configs(ROW_CONFIGS, {"BLOCK": block})] == warps
