import time

from dsx.core.timing import measure_ms


def test_measure_ms_is_the_median_of_real_runs():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    ms = measure_ms(work, warmup=2, iters=5)
    assert len(calls) == 7
    assert 1.5 < ms < 50
