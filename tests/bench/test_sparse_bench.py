import re
import statistics

from hybridattn.bench import sparse as bench


def test_quick_run_prints_every_target_as_a_measured_ratio(monkeypatch, capsys):
    captured = {}

    def keep_rows(title, rows, **kwargs):
        captured["rows"] = rows
        return all(r.passed for r in rows)

    monkeypatch.setattr(bench, "print_targets", keep_rows)
    bench.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = captured["rows"]
    assert len(rows) == 5
    speedup, memory, scaling, longformer, bigbird = rows
    assert speedup.higher_is_better and speedup.threshold == 6.0
    assert not memory.higher_is_better and memory.threshold == 1 / 8
    # the reference line against attention that materialises T x T: the window keeps a fraction of its memory
    ref = next(x for x in out.splitlines() if x.startswith("for reference"))
    assert "not a target" in ref and 0 < float(ref.split(" = ")[1].split()[0]) < 1
    # the forward rows are the median of the per-call ratios printed as they were measured
    for row, name in ((longformer, "Longformer"), (bigbird, "BigBird")):
        line = next(x for x in out.splitlines() if x.startswith(name))
        ratios = [float(x) for x in line.split("ratios ")[1].split()]
        assert len(ratios) == 3 and ratios == sorted(ratios)
        assert abs(row.ratio - statistics.median(ratios)) <= 0.006
        assert re.search(r"median of 3 paired ratios", row.measured)
        assert row.threshold == 1.5 and not row.higher_is_better
