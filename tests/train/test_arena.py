"""The arena: the smoke preset end to end through the CLI, summaries, the thesis check, TOML sweeps."""

import json
import math

import pytest
import torch

from hybridattn.cli import main
from hybridattn.train.arena import ArenaConfig, check_thesis, preset, summarize


def test_smoke_preset_through_the_cli_writes_every_output(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert main(["arena", "--preset", "smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    cfg = preset("smoke")
    assert [r["model"] for r in results["runs"]] == [m["label"] for m in cfg.models]
    by_model = {r["model"]: r for r in results["runs"]}
    assert by_model["attention"]["ratio"] == "0:4" and by_model["gdn small state"]["ratio"] == "4:0"
    assert by_model["gdn 3:1"]["layer_types"] == ["gated_deltanet"] * 3 + ["attention"]
    for r in results["runs"]:
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert len(r["curve"]) == cfg.train["steps"]
        inf = r["inference"]
        assert inf["contexts"] == [64, 128] and all(s > 0 for s in inf["decode_s"] + inf["prefill_s"])
        assert all(q1 <= m <= q3 for q1, m, q3 in zip(inf["decode_q1_s"], inf["decode_s"], inf["decode_q3_s"]))
        assert inf["peak_memory_bytes"] > 0
    # linear state does not grow with the context; a KV cache does, by exactly the extra entries; the small state
    # is the large one with fewer key dimensions
    lin, att = by_model["gdn small state"]["inference"], by_model["attention"]["inference"]
    assert lin["cache_bytes"][0] == lin["cache_bytes"][1] == lin["cache_bytes_eval"]
    assert att["cache_bytes"][1] > att["cache_bytes"][0] > lin["cache_bytes"][0]
    assert by_model["gdn large state"]["inference"]["cache_bytes_eval"] > lin["cache_bytes_eval"]
    assert [t["name"] for t in results["thesis"]] == [
        "attention accuracy", "gdn large state accuracy", "gdn large state - gdn small state", "attention - gdn 3:1"]
    assert all(t["expected"] is False for t in results["thesis"])  # 12 steps: plumbing, not the thesis
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "gdn 3:1" in html
    for name in ("accuracy_vs_state.png", "accuracy.png", "inference.png", "learning_curves.png",
                 "heldout_accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "models" / "mqar-attention-32" / "model.safetensors").exists()


def _run(model, seed, acc, width=64, task="mqar"):
    inf = {"contexts": [8], "decode_s": [1e-3], "prefill_s": [1e-3], "cache_bytes": [10], "cache_bytes_eval": 10,
           "peak_memory_bytes": 100}
    return {"task": task, "model": model, "width": width, "seed": seed, "ratio": "1:1", "params": 5,
            "accuracy": acc, "loss": 1.0, "tokens_per_s": 10.0, "inference": inf}


def test_summary_statistics_and_thesis_check():
    runs = [_run("attn", 0, 0.96), _run("attn", 1, 1.0), _run("lin", 0, 0.5), _run("lin", 1, 0.7),
            _run("hyb", 0, 0.95), _run("hyb", 1, 0.97)]
    rows = {r["model"]: r for r in summarize(runs)}
    assert rows["attn"]["accuracy_mean"] == pytest.approx(0.98)
    assert rows["attn"]["accuracy_std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert (rows["lin"]["accuracy_min"], rows["lin"]["accuracy_max"]) == (0.5, 0.7)
    thesis = check_thesis(list(rows.values()), {"task": "mqar", "full": "attn", "linear": "lin", "hybrid": "hyb"})
    assert [t["passed"] for t in thesis] == [True, True, True]
    assert thesis[1]["measured"] == pytest.approx(0.38) and thesis[2]["measured"] == pytest.approx(0.02)
    rows["hyb"]["accuracy_mean"] = 0.94
    assert [t["passed"] for t in check_thesis(list(rows.values()),
            {"task": "mqar", "full": "attn", "linear": "lin", "hybrid": "hyb"})] == [True, True, False]


def test_toml_config_and_validation(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('name = "mine"\nwidths = [32, 64]\nseeds = 2\n'
                    '[[tasks]]\nname = "copying"\nseq_len = 16\n'
                    '[[models]]\nlabel = "gla 3:1"\nhybrid = "3:1"\nlinear_mixer = "gla"\n'
                    '[train]\nsteps = 5\n')
    cfg = ArenaConfig.from_toml(path)
    assert cfg.widths == [32, 64] and cfg.tasks == [{"name": "copying", "seq_len": 16}]
    assert cfg.models[0]["linear_mixer"] == "gla" and cfg.train == {"steps": 5}
    path.write_text("widthz = [1]\n")
    with pytest.raises(ValueError, match="widthz"):
        ArenaConfig.from_toml(path)
    with pytest.raises(ValueError, match="seeds"):
        ArenaConfig(seeds=0)
    with pytest.raises(ValueError, match="lr"):
        ArenaConfig(train={"lr": -1.0})
    with pytest.raises(ValueError, match="preset"):
        preset("huge")


def test_the_terminal_summary_is_readable_at_80_columns():
    import io

    from rich.console import Console

    from hybridattn.train.arena import print_summary

    rows = [{"task": "mqar", "model": m, "width": 64, "ratio": r, "seeds": 3, "params": 218_688,
             "accuracy_mean": 0.9987, "accuracy_std": 0.0011, "loss_mean": 0.012, "tokens_per_s": 21_577.0,
             "contexts": [256, 1024, 4096], "decode_s": [3e-3, 4e-3, 5.73e-3], "cache_bytes_eval": 134_400,
             "peak_memory_bytes": 2_300_000} for m, r in (("attention", "0:4"), ("gated_deltanet", "4:0"),
                                                         ("gated_deltanet 3:1", "3:1"))]
    buf = io.StringIO()
    print_summary({"config": {"name": "quick"}, "summary": rows, "thesis": []}, console=Console(file=buf, width=80))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for text in ("gated_deltanet 3:1", "0.999 ± 0.001 (3)", "21,577", "218,688", "5.73", "131.2 KiB", "2.2 MiB"):
        assert sum(text in line for line in lines) >= 1, text  # each value whole on one line, not wrapped


def test_thesis_with_a_large_and_a_small_state_control():
    runs = [_run("attn", 0, 0.99), _run("big", 0, 0.93), _run("small", 0, 0.60), _run("hyb", 0, 0.975)]
    rows = summarize(runs)
    thesis = {"task": "mqar", "full": "attn", "large": "big", "small": "small", "hybrid": "hyb"}
    checks = check_thesis(rows, thesis)
    assert [(c["name"], c["passed"]) for c in checks] == [
        ("attn accuracy", True), ("big accuracy", True), ("big - small", True),
        ("attn - hyb", True)]
    assert checks[2]["measured"] == pytest.approx(0.33)
    rows[1]["accuracy_mean"] = 0.85  # the large-state control did not learn: its check and the gap say so
    assert [c["passed"] for c in check_thesis(rows, thesis)] == [True, False, True, True]
    rows[2]["accuracy_mean"] = 0.70
    assert [c["passed"] for c in check_thesis(rows, thesis)] == [True, False, False, True]
    from hybridattn.train.arena import thesis_mark

    smoke = check_thesis(rows, {**thesis, "expected": False})
    assert thesis_mark(smoke[1]) == "not expected to pass at this budget" and thesis_mark(smoke[0]) == "PASS"
