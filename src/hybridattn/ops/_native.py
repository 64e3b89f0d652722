"""hybridattn's compiled CPU kernels (``ops/csrc/*.cpp``), built on first use with the machine's C++ compiler and
cached, as ``torch.ops.hybridattn.*``.

Why compiled at all: the per-chunk work of the linear mechanisms is a dozen small products per chunk and head. From
Python they run batched over heads, one op at a time, and on a CPU those ops are too small to use a second core;
the kernels give each thread whole heads instead (see ``csrc/gated_delta.cpp``).

Every kernel has a pure-PyTorch twin that the ops fall back to, with one warning, where no compiler is found or the
build fails, and always for tensors that are not on the CPU or not float32/float64. Set
``HYBRIDATTN_NATIVE=0`` to use the PyTorch forms everywhere; :func:`disabled` does the same inside a block (the
tests compare both).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
_built: dict[str, object] = {}  # kernel file stem -> torch.ops.hybridattn, or None when its build failed
_state = {"off": False}


def _cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags: the kernels are built with ``-march=native``, so
    a cache shared between different machines must not hand one machine's build to another."""
    info = platform.machine()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        info += "".join(sorted(set(lines)))
    return hashlib.sha1(info.encode()).hexdigest()[:8]


KERNELS = tuple(sorted(p.stem for p in _CSRC.glob("*.cpp")))


def _build(kernel: str):
    from torch.utils import cpp_extension

    source = _CSRC / f"{kernel}.cpp"
    # One cache entry per kernel, CPU and source text (shared headers included): two checkouts (or versions) never
    # rebuild over each other.
    texts = [source.read_bytes()] + [h.read_bytes() for h in sorted(_CSRC.glob("*.h"))]
    digest = hashlib.sha1(b"".join(texts)).hexdigest()[:8]
    name = f"hybridattn_{kernel}_{_cpu_tag()}_{digest}"
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]  # OpenMP: at::parallel_for is a header template
    base = cpp_extension._get_build_directory(name, verbose=False)  # honours TORCH_EXTENSIONS_DIR
    built_before = any(Path(base).glob("*.so"))
    if not built_before:  # a first build takes 10-20 s per kernel: say so rather than look like a hang
        print(f"hybridattn: building the compiled kernel {kernel} (first use, ~10-20 s; cached in {base})",
              file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=os.environ.get("HYBRIDATTN_NATIVE_VERBOSE") == "1")
    return torch.ops.hybridattn


def native_ops(kernel: str):
    """``torch.ops.hybridattn`` once ``csrc/<kernel>.cpp`` is built (each file is its own library, built on first
    use), or None: disabled, or the build failed (warned once per kernel)."""
    if _state["off"] or os.environ.get("HYBRIDATTN_NATIVE", "1") == "0":
        return None
    if kernel not in _built:
        _built[kernel] = None
        try:
            _built[kernel] = _build(kernel)
        except Exception as err:  # no compiler, no ninja, headers missing: the PyTorch forms still work
            warnings.warn(
                f"hybridattn: building the compiled CPU kernel {kernel!r} failed ({type(err).__name__}: {err}); "
                "using the pure-PyTorch form, which is slower on a CPU. Set HYBRIDATTN_NATIVE=0 to skip the build.",
                RuntimeWarning, stacklevel=3,
            )
    return _built[kernel]


def build_all(*, log=print) -> dict[str, bool]:
    """Build (or load from the cache) every compiled kernel now, reporting each; ``{kernel: built}``."""
    import time

    out = {}
    for kernel in KERNELS:
        start = time.perf_counter()
        ok = native_ops(kernel) is not None
        out[kernel] = ok
        log(f"{kernel}: {'ready' if ok else 'not built (the PyTorch form will run)'} "
            f"({time.perf_counter() - start:.1f} s)")
    return out


def built(kernel: str):
    """``torch.ops.hybridattn`` if ``csrc/<kernel>.cpp`` was already built in this process, else None (never builds)."""
    return _built.get(kernel)


def usable(*tensors) -> bool:
    """Whether a compiled CPU kernel can take these tensors (None entries allowed): all on the CPU, all float32 or
    all float64."""
    xs = [x for x in tensors if x is not None]
    dtype = xs[0].dtype
    return dtype in (torch.float32, torch.float64) and all(x.device.type == "cpu" and x.dtype == dtype for x in xs)


@contextlib.contextmanager
def disabled():
    """Use the pure-PyTorch forms inside the block."""
    before = _state["off"]
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before
