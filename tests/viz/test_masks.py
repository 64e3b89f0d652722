"""`hybridattn viz masks`: the PNG is written and each panel is the spec's dense mask."""

import matplotlib.image
import pytest
import torch

from hybridattn.cli import main
from hybridattn.viz.masks import default_patterns, draw_masks


def test_cli_writes_png_with_selected_panels(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["viz", "masks", "--length", "32", "--out", str(out), "--patterns", "bigbird,fixed", "--dpi", "50"]) == 0
    assert "3 patterns at T=32" in capsys.readouterr().out
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (int(3.7 * 50), int(3.2 * 3 * 50))  # one row of three panels at 50 dpi


def test_panels_are_the_dense_masks(tmp_path, monkeypatch):
    drawn = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, x, **kw: drawn.append(x))
    patterns = default_patterns(40)
    draw_masks(patterns, 40, tmp_path / "x.png", dpi=30)
    assert len(drawn) == len(patterns)
    for image, spec in zip(drawn, patterns.values()):
        dense = spec.dense(40, 40)[0, 0]
        assert torch.equal(torch.from_numpy(image).bool(), dense)
        assert int(dense.sum()) == spec.kept_pairs(40, 40)


def test_unknown_pattern_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="--patterns"):
        main(["viz", "masks", "--out", str(tmp_path / "x.png"), "--patterns", "nothing"])
