from hybridattn.bench import softmax as bench


def test_auto_vs_sdpa_rows_are_ratios_of_measured_times():
    rows = bench.auto_vs_sdpa(512, 1, 32, rounds=1, device="cpu")
    assert [r.threshold for r in rows] == [0.95, 0.95]
    for r in rows:
        auto_ms = float(r.measured.split("auto ")[1].split(" ms")[0])
        sdpa_ms = float(r.measured.split("sdpa ")[1].split(" ms")[0])
        assert abs(r.ratio - sdpa_ms / auto_ms) <= 0.06 * r.ratio  # the printed times are rounded to 0.01 ms


def test_tiled_memory_row_is_below_the_matrix():
    row = bench.tiled_memory(2048, 1, 64, device="cpu")
    assert not row.higher_is_better and row.threshold == 0.01
    assert "16.0 MiB" in row.measured  # 2048^2 fp32
    assert 0 < row.ratio < 0.5
