"""The compiled-kernel loader: a failed build warns once and leaves the PyTorch forms in charge; the switches work."""

from __future__ import annotations

import pytest
import torch

from hybridattn.ops import _native, gated_delta_rule


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 37, 2, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 37, 2, 6, generator=gen)
    g = -torch.rand(1, 37, 2, generator=gen)
    beta = torch.rand(1, 37, 2, generator=gen)
    return q, k, v, g, beta


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken(kernel):
        raise OSError("no compiler here")

    monkeypatch.setattr(_native, "_build", broken)
    monkeypatch.setattr(_native, "_built", {})
    monkeypatch.setenv("HYBRIDATTN_NATIVE", "1")  # the build is attempted (and fails) even in a run that has it off
    with pytest.warns(RuntimeWarning, match="'gated_delta' failed .*no compiler here"):
        assert _native.native_ops("gated_delta") is None
    with _native.disabled():
        expected = gated_delta_rule(*_inputs(), use_qk_l2norm=True)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        got = gated_delta_rule(*_inputs(), use_qk_l2norm=True)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_switches(monkeypatch):
    monkeypatch.setenv("HYBRIDATTN_NATIVE", "0")
    assert _native.native_ops("gated_delta") is None
    monkeypatch.delenv("HYBRIDATTN_NATIVE")
    with _native.disabled():
        assert _native.native_ops("gated_delta") is None


def test_usable_needs_cpu_and_one_float_dtype():
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert _native.usable(x32, None, x32) and _native.usable(x64, x64)
    assert not _native.usable(x32, x64)
    assert not _native.usable(x32.bfloat16())


def test_a_first_build_says_so_on_stderr_and_build_all_reports_each(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("HYBRIDATTN_NATIVE", "1")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)  # no compiler run in this test
    monkeypatch.setattr(_native, "_built", {})
    _native._build("gated_delta")
    err = capsys.readouterr().err
    assert "building the compiled kernel gated_delta (first use" in err and str(tmp_path) in err
    lines = []
    monkeypatch.setattr(_native, "native_ops", lambda kernel: None if kernel == "moe_decode" else object())
    assert _native.build_all(log=lines.append)["moe_decode"] is False
    assert [line.split(":")[0] for line in lines] == list(_native.KERNELS)
    assert "moe_decode: not built" in lines[-1]
