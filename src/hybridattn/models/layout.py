"""Layer layouts: which mixer each layer of a model uses, written three ways.

1. An explicit list of mixer names, one per layer: ``["gated_deltanet", "gated_deltanet", "attention"]``.
2. A ratio ``"L:S"`` (``hybrid="3:1"``): in every period of ``L + S`` layers the first ``L`` use the linear
   mixer and the last ``S`` the softmax mixer, so ``"3:1"`` puts softmax at layers 3, 7, 11, ... as
   Qwen3-Next does; ``"1:0"`` is pure linear, ``"0:1"`` pure softmax.
3. A pattern string, grammar::

       pattern := item ([","] item)*
       item    := atom ["*" COUNT]
       atom    := NAME | "L" | "A" | "(" pattern ")"

   ``L`` is the config's linear mixer, ``A`` its softmax mixer; NAME is any registered mixer or an alias
   (``gdn`` = gated_deltanet, ``attn`` = attention, ``swa`` = attention). Letters may be run together:
   ``"LLLA"`` = ``"L*3,A"``. If the pattern is shorter than ``num_layers`` and divides it, it is repeated:
   ``"LLLA"`` with 12 layers = ``"(L*3,A)*3"``. Spaces are ignored.
"""

from __future__ import annotations

import re

ALIASES = {"gdn": "gated_deltanet", "attn": "attention", "swa": "attention", "softmax": "attention"}

_TOKEN = re.compile(r"\s*(?:(?P<name>[a-z][a-z0-9_]*)|(?P<letter>[LA])|(?P<num>\d+)|(?P<sym>[(),*]))")


def _tokenize(pattern: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    stripped = pattern.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None or m.end() == pos:
            raise ValueError(
                f"pattern: unexpected character {stripped[pos:].lstrip()[:1]!r} at position {pos} in {pattern!r} "
                "(expected mixer names, L, A, '(', ')', '*', digits or ',')"
            )
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def parse_pattern(pattern: str, *, linear: str, softmax: str) -> list[str]:
    """Expand a pattern string into mixer names (aliases and ``L``/``A`` resolved), without repetition
    to ``num_layers``. Raises ``ValueError`` naming ``pattern`` on a syntax error."""
    tokens = _tokenize(pattern)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else (None, None)

    def parse_seq(depth: int) -> list[str]:
        nonlocal pos
        out: list[str] = []
        while True:
            kind, value = peek()
            if kind in ("name", "letter") or value == "(":
                out.extend(parse_item(depth))
            elif value == "," and out:
                pos += 1
                if peek()[0] is None or peek()[1] in (")", ","):
                    raise ValueError(f"pattern: expected an item after ',' in {pattern!r}")
            else:
                break
        if not out:
            raise ValueError(f"pattern: expected at least one layer in {pattern!r}")
        return out

    def parse_item(depth: int) -> list[str]:
        nonlocal pos
        kind, value = peek()
        pos += 1
        if value == "(":
            atom = parse_seq(depth + 1)
            if peek()[1] != ")":
                raise ValueError(f"pattern: expected ')' to close '(' in {pattern!r}")
            pos += 1
        elif kind == "letter":
            atom = [linear if value == "L" else softmax]
        else:
            atom = [ALIASES.get(value, value)]
        if peek()[1] == "*":
            pos += 1
            kind, value = peek()
            if kind != "num" or int(value) < 1:
                raise ValueError(f"pattern: expected a count >= 1 after '*' in {pattern!r}, received {value!r}")
            pos += 1
            atom = atom * int(value)
        return atom

    layers = parse_seq(0)
    if pos != len(tokens):
        raise ValueError(f"pattern: unexpected {tokens[pos][1]!r} in {pattern!r}")
    return layers


def format_pattern(names: list[str]) -> str:
    """The shortest-period pattern string for a list of mixer names: ``["gla"] * 3 + ["attention"]`` repeated
    twice -> ``"(gla*3,attention)*2"``. ``parse_pattern(format_pattern(names), ...) == names``."""
    if not names:
        raise ValueError("names: expected at least one mixer name, received []")
    n = len(names)
    period = next(p for p in range(1, n + 1) if n % p == 0 and names[:p] * (n // p) == names)
    runs: list[list] = []
    for name in names[:period]:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    body = ",".join(name if count == 1 else f"{name}*{count}" for name, count in runs)
    repeats = n // period
    if repeats == 1:
        return body
    return f"({body})*{repeats}" if len(runs) > 1 or runs[0][1] > 1 else f"{body}*{repeats}"


def parse_ratio(ratio: str) -> tuple[int, int]:
    """``"3:1"`` -> ``(3, 1)``; raises ``ValueError`` naming ``hybrid``."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio) if isinstance(ratio, str) else None
    if m is None or int(m.group(1)) + int(m.group(2)) == 0:
        raise ValueError(f"hybrid: expected 'L:S' with L linear and S softmax layers per period (e.g. '3:1'), "
                         f"received {ratio!r}")
    return int(m.group(1)), int(m.group(2))


def resolve_layout(*, num_layers: int, layers, hybrid, pattern, linear: str, softmax: str) -> list[str]:
    """The mixer name of every layer from exactly one of ``layers`` / ``hybrid`` / ``pattern``."""
    given = [n for n, v in (("layers", layers), ("hybrid", hybrid), ("pattern", pattern)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"layers/hybrid/pattern: expected at most one layout, received {given}")
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(isinstance(x, str) for x in layers):
            raise TypeError(f"layers: expected a list of mixer names, received {layers!r}")
        names = [ALIASES.get(x, x) for x in layers]
        if len(names) != num_layers:
            raise ValueError(f"layers: expected {num_layers} names (num_layers), received {len(names)}")
        return names
    if pattern is not None:
        if not isinstance(pattern, str):
            raise TypeError(f"pattern: expected a str, received {type(pattern).__name__}")
        names = parse_pattern(pattern, linear=linear, softmax=softmax)
        if num_layers % len(names) != 0:
            raise ValueError(f"pattern: expected a length dividing num_layers={num_layers}, "
                             f"received {len(names)} layers from {pattern!r}")
        return names * (num_layers // len(names))
    n_lin, n_soft = parse_ratio("3:1" if hybrid is None else hybrid)
    period = n_lin + n_soft
    return [linear if i % period < n_lin else softmax for i in range(num_layers)]
