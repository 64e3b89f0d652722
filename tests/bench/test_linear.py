"""Smoke test of the linear benchmark at small sizes (the targets themselves are checked by running it)."""

import pytest

from hybridattn.bench import linear


@pytest.mark.slow
def test_linear_bench_quick_runs(capsys):
    assert linear.main(["--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("forward vs", "FLOP efficiency", "decode step after", "peak memory per token"):
        assert row in out
    assert linear.FLOP_FORMULA in out
