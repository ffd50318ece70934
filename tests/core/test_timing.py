import time

from dsx.core.timing import compare_ms, measure_ms


def test_measure_ms_is_the_median_of_real_runs():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    ms = measure_ms(work, warmup=2, iters=5)
    assert len(calls) == 7
    assert 1.5 < ms < 50


def test_compare_ms_interleaves_and_ranks():
    order = []

    def fast():
        order.append("fast")

    def slow():
        order.append("slow")
        time.sleep(0.003)

    ms = compare_ms({"fast": fast, "slow": slow}, warmup=1, iters=4)
    assert order == ["fast", "slow"] * 5
    assert ms["fast"] < 1 < 2.5 < ms["slow"] < 50
