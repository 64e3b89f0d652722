import time

import pytest
import torch

from hybridattn.bench.measure import (
    TargetRow,
    format_bytes,
    matmul_flops_per_second,
    median_time,
    peak_memory,
    print_targets,
)

MiB = 2**20


def test_peak_memory_of_one_64mib_tensor():
    def fn():
        x = torch.empty(16 * MiB, dtype=torch.float32)  # 64 MiB
        x.fill_(1.0)

    peak = peak_memory(fn, device="cpu")
    assert 64 * MiB <= peak <= 64 * MiB + MiB


def test_peak_memory_of_a_chain_of_temporaries_is_the_peak_not_the_sum():
    def fn():
        t = torch.ones(4 * MiB)  # 16 MiB each
        for _ in range(5):
            t = t * 2.0  # the new result is allocated while the old one is still alive, then the old one dies

    peak = peak_memory(fn, device="cpu")
    # two 16 MiB tensors alive at once; the sum of all six allocations would be 96 MiB
    assert 32 * MiB <= peak <= 33 * MiB


def test_peak_memory_ignores_what_was_live_before():
    big = torch.ones(8 * MiB)  # 32 MiB live at entry, freed inside fn
    holder = [big]
    del big

    def fn():
        holder.clear()  # frees 32 MiB allocated before fn
        torch.ones(2 * MiB)  # 8 MiB

    peak = peak_memory(fn, device="cpu")
    assert 0 <= peak <= 8 * MiB + MiB


def test_median_time_is_the_median_of_repeats(monkeypatch):
    # A fake clock that each call advances by its own duration: the result is exact, whatever the machine's load
    # (a sleeping version failed once when a 0 s call measured 33 ms on a busy machine).
    import hybridattn.bench.measure as measure

    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    durations = iter([9.0, 0.05, 0.01, 0.02, 0.05, 0.03])  # warmup, then 5 timed calls: median 0.03

    calls = []

    def fn():
        calls.append(1)
        now[0] += next(durations)

    t = median_time(fn, repeats=5, warmup=1, device="cpu")
    assert len(calls) == 6
    assert t == pytest.approx(0.03)


def test_median_time_measures_a_sleep():
    t = median_time(lambda: time.sleep(0.02), repeats=3, warmup=0, device="cpu")
    assert 0.02 <= t < 0.2


def test_matmul_flops_per_second_is_positive_and_finite():
    f = matmul_flops_per_second(torch.float32, "cpu", n=128, repeats=3)
    assert 1e6 < f < 1e15


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(repeats=0), ValueError),
        (dict(warmup=-1), ValueError),
        (dict(repeats=1.5), TypeError),
    ],
)
def test_median_time_validates(kwargs, err):
    with pytest.raises(err, match=next(iter(kwargs))):
        median_time(lambda: None, **kwargs)


def test_non_callable_is_rejected():
    with pytest.raises(TypeError, match="fn"):
        peak_memory(3)
    with pytest.raises(TypeError, match="fn"):
        median_time("x")


def test_target_rows_and_table(capsys):
    from rich.console import Console

    hi = TargetRow("speed", ">= 0.95", "1.0 s", ratio=0.97, threshold=0.95)
    lo = TargetRow("memory", "<= 0.01", "1 MiB", ratio=0.5, threshold=0.01, higher_is_better=False)
    assert hi.passed and not lo.passed
    console = Console(width=200, force_terminal=False)
    assert print_targets("demo", [hi, lo], console=console) is False
    out = capsys.readouterr().out
    assert "PASS" in out and "MISS" in out and "0.97" in out


def test_format_bytes():
    assert format_bytes(64 * MiB) == "64.0 MiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(12) == "12 B"


def test_format_seconds():
    from hybridattn.bench.measure import format_seconds

    assert format_seconds(0.95) == "950 ms"
    assert format_seconds(42.64) == "42.6 s"
