"""The Summary page's MMLU comparison (layerlens.dashboard.mmlu)."""

from __future__ import annotations

import pytest

from layerlens.dashboard.mmlu import MIN_MMLU_QUESTIONS, mmlu_comparison


def test_mmlu_comparison_counts_questions_and_flags_tiny_samples():
    import pandas as pd

    def frame(n):
        f = pd.DataFrame({"strategy": ["bi", "bi"], "removed_layers": ["", "3,4"], "mmlu_accuracy": [0.30, 0.25]})
        if n is not None:
            f["mmlu_questions"] = n
        return f

    big = mmlu_comparison([frame(57)], (3, 4))
    assert big.meaningful and big.questions == 57
    assert big.delta_text() == "-5.0 pts (was 30.0%) on 57 questions"
    assert big.standard_error_pts() == pytest.approx(100 * (0.25 * 0.75 / 57) ** 0.5)
    tiny = mmlu_comparison([frame(MIN_MMLU_QUESTIONS - 1)], (3, 4))
    assert not tiny.meaningful and "pts" not in tiny.delta_text() and "too few" in tiny.delta_text()
    unknown = mmlu_comparison([frame(None)], [3, 4])  # a sweep saved before the count was recorded
    assert unknown.questions is None and not unknown.meaningful and "unknown" in unknown.delta_text()
    assert mmlu_comparison([frame(57)], (1,)) is None
