"""Numbers for people: one way to write a perplexity, a percentage, a size, a time or a speed, used by the
dashboard's pages and the HTML report alike (``3.6e12``, never ``3582230116909.84``).

Pure functions of plain numbers; a missing or non-finite value reads ``–``. Signs are ASCII (``+``/``-``):
Streamlit's metric reads a leading ``-`` as "down".

:func:`verdict` turns a perplexity ratio into the one word a non-expert needs (usable / degraded / broken).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MISSING = "–"

# Perplexity of the pruned model over the original's: above DEGRADED_AT the quality loss is plain to see,
# at BROKEN_AT or more the model's text is not usable (issue 14: "more than 2×; at 10× say broken").
DEGRADED_AT = 2.0
BROKEN_AT = 10.0


def _finite(x: Any) -> bool:
    if x is None or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _scientific(x: float, digits: int) -> str:
    mantissa, exponent = f"{x:.{max(digits - 1, 0)}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def number(x: Any, digits: int = 3) -> str:
    """At most ``digits`` significant digits below 1,000 (``51.9``, ``0.25``, ``8``); whole numbers with
    separators up to a million (``23,699``); scientific above (``3.6e12``) and for tiny values (``1.2e-4``)."""
    if not _finite(x):
        return MISSING
    v = float(x)
    a = abs(v)
    if a >= 1e6:
        return _scientific(v, 2)
    if a == 0:
        return "0"
    if a < 1e-3:
        return _scientific(v, 2)
    decimals = max(0, digits - 1 - math.floor(math.log10(a)))
    text = f"{v:.{decimals}f}"
    if abs(float(text)) >= 1000:  # 999.7 rounds up to the next band
        return f"{round(v):,}"
    return text.rstrip("0").rstrip(".") if "." in text else text  # 2.50 -> 2.5, 8.00 -> 8


def perplexity(x: Any) -> str:
    """Two decimals below 100 (``51.92``: small changes matter there), whole numbers up to a million
    (``1,229``), scientific beyond (``3.6e12``)."""
    if not _finite(x):
        return MISSING
    v = float(x)
    if abs(v) < 100:
        return f"{v:.2f}"
    return number(v)


def percent(fraction: Any, digits: int = 1, signed: bool = False) -> str:
    """A fraction as a percentage, ``0.267`` -> ``26.7%`` (``+26.7%`` with ``signed``)."""
    if not _finite(fraction):
        return MISSING
    v = 100 * float(fraction)
    return f"{v:+.{digits}f}%" if signed else f"{v:.{digits}f}%"


def ratio(x: Any) -> str:
    """How many times: ``1.3×``, ``69×``, ``7.0e10×``."""
    if not _finite(x):
        return MISSING
    return f"{number(x, 2)}×"


def change(after: Any, before: Any) -> str:
    """A change for a metric's delta: a signed percentage while below 2× (``+12.3%``, ``-4.0%``), else how
    many times higher (``69× higher``): +6,900,000,000% helps nobody."""
    if not (_finite(after) and _finite(before)) or float(before) == 0:
        return MISSING
    r = float(after) / float(before)
    if r < DEGRADED_AT:
        return percent(r - 1, signed=True)
    return f"{ratio(r)} higher"


def params(n: Any) -> str:
    """A parameter count: ``134.5 M``, ``1.24 B``, ``900.0 k``."""
    if not _finite(n):
        return MISSING
    v = float(n)
    if v >= 1e9:
        return f"{v / 1e9:.2f} B"
    if v >= 1e6:
        return f"{v / 1e6:.1f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{int(v)}"


def seconds(s: Any) -> str:
    """A duration: ``850 ms``, ``4.2 s``, ``2 min 05 s``, ``1 h 05 min``."""
    if not _finite(s):
        return MISSING
    v = float(s)
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 60:
        return f"{v:.1f} s"
    total = round(v)
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


def tokens_per_s(median: Any, spread: Any = None) -> str:
    """A generation speed with its spread when known: ``24.3 ± 1.2 tokens/s``."""
    if not _finite(median):
        return MISSING
    if _finite(spread) and float(spread) > 0:
        return f"{number(median)} ± {number(spread, 2)} tokens/s"
    return f"{number(median)} tokens/s"


@dataclass(frozen=True)
class Verdict:
    """Whether a pruned model is usable, from its quick perplexity against the original's."""

    level: str  # usable | degraded | broken | unknown
    ratio: float  # pruned / original perplexity (nan when unknown)
    after: float
    before: float

    @property
    def bad(self) -> bool:
        """Degraded or broken: say so in red and show no speed-up as a win beside it."""
        return self.level in ("degraded", "broken")

    def headline(self) -> str:
        """One plain sentence: the word, then the numbers that earn it."""
        nums = f"perplexity {perplexity(self.after)} vs {perplexity(self.before)} for the original"
        times = ratio(self.ratio) if math.isfinite(self.ratio) else "immeasurably"
        if self.level == "broken":
            return (f"Broken: {nums} ({times} higher). The pruned model's text is not usable; "
                    "remove fewer layers or choose another plan.")
        if self.level == "degraded":
            return (f"Degraded: {nums} ({times} higher). Quality is clearly worse; remove fewer "
                    "layers, or heal (fine-tune) the pruned model before using it.")
        if self.level == "usable":
            return f"Usable: {nums} ({change(self.after, self.before)})."
        return "Not measured yet: apply the plan to see its quality."


def verdict(after: Any, before: Any) -> Verdict:
    """usable (perplexity within :data:`DEGRADED_AT` × the original's), degraded (above), broken (at
    :data:`BROKEN_AT` × or more, or not finite: an overflowing perplexity is a broken model)."""
    if not _finite(before) or float(before) <= 0 or after is None:
        return Verdict("unknown", math.nan, math.nan, math.nan)
    a, b = float(after), float(before)
    r = a / b if math.isfinite(a) else math.inf
    level = "broken" if r >= BROKEN_AT else "degraded" if r > DEGRADED_AT else "usable"
    return Verdict(level, r, a, b)


__all__ = [
    "BROKEN_AT", "DEGRADED_AT", "MISSING", "Verdict", "change", "number", "params", "percent", "perplexity",
    "ratio", "seconds", "tokens_per_s", "verdict",
]
