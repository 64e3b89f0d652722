"""Smoke test of the linear benchmark at small sizes (the targets themselves are checked by running it)."""

import pytest

from hybridattn.bench import linear


@pytest.mark.slow
def test_linear_bench_quick_runs(capsys):
    assert linear.main(["--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # rich wraps long cells at the captured terminal's width, so look for words that stay on one line
    for word in ("fla", "transformers", "efficiency", "decode", "memory", "PASS"):
        assert word in out
    assert linear.FLOP_FORMULA in out
