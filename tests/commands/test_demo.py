import argparse

from rich.console import Console

from hybridattn.commands import demo


def run_demo(capsys, *argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def test_demo_measures_dense_and_tiled(capsys, monkeypatch):
    monkeypatch.setattr("hybridattn._tables._console", lambda c: c or Console(width=300))
    out = run_demo(capsys, "--lengths", "64", "256", "--repeats", "1", "--max-dense-gib", "1")
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}
    assert rows["64"][0] == "16.0 KiB" and rows["256"][0] == "256.0 KiB"  # T^2 * 4 bytes
    # the dense path holds at least the T x T logits; the tiled one stays below it at T = 256
    dense_peak = float(rows["256"][1].split()[0])
    assert rows["256"][1].endswith("KiB") and dense_peak >= 256
    assert rows["256"][3].endswith("KiB") and float(rows["256"][3].split()[0]) < dense_peak


def test_demo_skips_dense_when_it_would_not_fit(capsys, monkeypatch):
    monkeypatch.setattr("hybridattn._tables._console", lambda c: c or Console(width=300))
    out = run_demo(capsys, "--lengths", "128", "--repeats", "1", "--max-dense-gib", "0")
    assert "skipped (would need ~256.0 KiB)" in out  # 4 copies of the 64 KiB matrix
