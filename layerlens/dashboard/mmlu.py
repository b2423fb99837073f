"""The Summary page's MMLU line: a plan's accuracy against the original's, from the sweeps that measured it,
and whether the number of questions behind it is enough for the difference to mean anything."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Below this many questions an accuracy difference is noise: one question moves accuracy by >= 5 points, and
# the binomial standard error at 30 % accuracy is >= 10 points.
MIN_MMLU_QUESTIONS = 20


@dataclass(frozen=True)
class MMLUComparison:
    """MMLU accuracy of a plan and of the original model (fractions 0..1) from one sweep, and on how many
    questions (``None`` when the sweep did not record it)."""

    after: float
    before: float | None
    questions: int | None

    @property
    def meaningful(self) -> bool:
        """Enough questions for the difference to say something (see :data:`MIN_MMLU_QUESTIONS`)."""
        return self.questions is not None and self.questions >= MIN_MMLU_QUESTIONS

    def delta_text(self) -> str:
        """The metric's delta line: the difference with its question count, or why it is not shown."""
        was = f"was {self.before:.1%}" if self.before is not None else "original not measured"
        if self.questions is None:
            return f"{was}; number of questions unknown, re-run the sweep to compare"
        on = f"{self.questions} question{'s' if self.questions != 1 else ''}"
        if not self.meaningful:
            return f"{was} on {on}: too few for the difference to mean anything (need {MIN_MMLU_QUESTIONS}+)"
        if self.before is None:
            return f"on {on}"
        return f"{(self.after - self.before) * 100:+.1f} pts ({was}) on {on}"

    def standard_error_pts(self) -> float | None:
        """Binomial standard error of ``after`` in accuracy points (None without a question count)."""
        if not self.questions:
            return None
        return 100 * math.sqrt(self.after * (1 - self.after) / self.questions)


def mmlu_comparison(frames: Sequence[Any], removed_layers: Sequence[int]) -> MMLUComparison | None:
    """The plan removing ``removed_layers`` vs the original (the ``removed_layers == ""`` row) in the first
    sweep frame that measured MMLU for the plan; ``None`` when none did. The question count comes from the
    frame's ``mmlu_questions`` column (written by the dashboard's sweeps; older saved sweeps lack it)."""
    removed = ",".join(map(str, removed_layers))
    for frame in frames:
        if "mmlu_accuracy" not in frame:
            continue
        ok = frame[frame["mmlu_accuracy"].notna()]
        layers = ok["removed_layers"].fillna("").astype(str)
        after, before = ok[layers == removed], ok[layers == ""]
        if not len(after):
            continue
        n = after["mmlu_questions"].iloc[0] if "mmlu_questions" in after else None
        return MMLUComparison(after=float(after["mmlu_accuracy"].iloc[0]),
                              before=float(before["mmlu_accuracy"].iloc[0]) if len(before) else None,
                              questions=None if n is None or n != n else int(n))
    return None


__all__ = ["MIN_MMLU_QUESTIONS", "MMLUComparison", "mmlu_comparison"]
