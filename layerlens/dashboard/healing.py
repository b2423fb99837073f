"""The Heal page's logic: its controls as a :class:`~layerlens.heal.HealConfig`, and the before/after
numbers of the original, the pruned and the healed model measured alike.

The three are measured the way the Prune page measures two (:mod:`layerlens.compare`): perplexity on the
quick held-out windows, greedy generation timed with the runs of the three models interleaved (so machine
load drifts over all alike) and its text; plus MMLU's mean probability of the correct answer letter on a
few questions (one per subject by default: 57), a smoother signal than accuracy on so few questions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from .. import humanize
from ..compare import (
    QUICK_SPEED,
    QUICK_WINDOWS,
    SpeedSettings,
    measure_generation,
    quick_perplexity,
    timing_threads,
)
from ..errors import LayerLensError, for_interface
from ..evaluation import MMLUTask, harness_max_length, model_device, plain_forward
from ..heal import HealConfig

SIDES = ("original", "pruned", "healed")
SIDE_LABELS = {"original": "Original", "pruned": "Pruned", "healed": "Healed"}

LOSS_CHOICES = ("kd", "lm", "both")
LOSS_LABELS = {"kd": "Distillation from the original (kd)", "lm": "Next-token loss (lm)",
               "both": "Both, weighted half and half"}
TARGET_CHOICES = ("all", "cut")
TARGET_LABELS = {"all": "Every layer", "cut": "Layers next to the cut"}
DEMO_SECONDS = 60  # the default time budget: enough for a visible gain on a CPU, short enough for a demo
MMLU_PER_SUBJECT = 1  # questions per subject for the table (57 subjects)

# The page's words for HealConfig's parameters (library messages name them in backticks).
CONTROL_LABELS = {"loss": "Loss", "seconds": "Time budget", "steps": "Step limit", "lr": "Learning rate",
                  "lora_rank": "LoRA rank", "targets": "LoRA on", "eval_every": "Held-out checkpoint every"}

Progress = Callable[[int, int, str], None]


def heal_config(*, loss: str, seconds: float, steps: int, lora_rank: int, lr: float, targets: str,
                eval_every: int = HealConfig.eval_every, hidden_size: int | None = None) -> HealConfig:
    """The page's controls as a config (``steps`` 0: the time budget alone; LoRA alpha twice the rank, as
    the CLI), checked here so a mistake is one sentence in the page's own words before anything runs."""
    config = HealConfig(loss=loss, seconds=float(seconds) if seconds else None, steps=int(steps) or None,
                        lr=float(lr), lora_rank=int(lora_rank), lora_alpha=2.0 * int(lora_rank), targets=targets,
                        eval_every=int(eval_every))
    try:
        config.validate(hidden_size)
    except LayerLensError as exc:
        raise LayerLensError(for_interface(str(exc), CONTROL_LABELS)) from exc
    return config


def _noop(done: int, total: int, label: str) -> None:
    return None


def measure_three(models: Mapping[str, Any], tokenizer: Any, prompt: str, *, questions: Any = None,
                  known: Mapping[str, Mapping[str, Any]] | None = None, speed: SpeedSettings = QUICK_SPEED,
                  progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """``{side: numbers}`` for ``models`` (``original``, ``pruned``, ``healed``): ``perplexity`` (quick
    windows), ``mmlu_prob_correct`` / ``mmlu_accuracy`` / ``mmlu_questions`` (with ``questions``), the
    speed (:meth:`layerlens.compare.Speed.to_dict`) and ``generation``.

    ``known``: numbers already measured per side (the Prune page's quick perplexity, an MMLU score from a
    cache); those are not measured again. Speed and text are always measured, all models together."""
    known = known or {}
    progress = progress or _noop
    sides = [s for s in SIDES if s in models]
    out: dict[str, dict[str, Any]] = {s: dict(known.get(s, {})) for s in sides}
    ppl_todo = [s for s in sides if out[s].get("perplexity") is None]
    mmlu_todo = [s for s in sides if questions is not None and out[s].get("mmlu_prob_correct") is None]
    total = len(ppl_todo) + len(mmlu_todo) + len(sides) * (1 + speed.runs)
    done = 0
    device = model_device(models[sides[0]])
    with timing_threads(device, speed.threads):
        for s in ppl_todo:
            progress(done, total, f"{SIDE_LABELS[s]} model: perplexity on {QUICK_WINDOWS} windows")
            out[s]["perplexity"] = quick_perplexity(models[s], tokenizer)
            done += 1
        if mmlu_todo:
            task = MMLUTask(tokenizer, questions, max_length=harness_max_length(models[sides[0]], tokenizer))
            for s in mmlu_todo:
                progress(done, total, f"{SIDE_LABELS[s]} model: MMLU, {len(task.questions)} questions")
                result = task.run(plain_forward(models[s]))
                out[s].update(mmlu_prob_correct=result.mean_prob_correct, mmlu_accuracy=result.accuracy,
                              mmlu_questions=result.n)
                done += 1
    measured = measure_generation([models[s] for s in sides], [f"{SIDE_LABELS[s]} model" for s in sides], tokenizer,
                                  prompt, speed, progress, done, total)
    for s, (spd, text) in zip(sides, measured, strict=True):
        out[s].update(spd.to_dict(), generation=text)
    progress(total, total, "Done")
    return out


def comparison_frame(numbers: Mapping[str, Mapping[str, Any]], layers: Mapping[str, int]) -> pd.DataFrame:
    """The before/after table for people: one row per model (original, pruned, healed), numbers written
    by :mod:`layerlens.humanize`; changes against the original in brackets."""
    base = numbers.get("original", {})
    rows = []
    for side in (s for s in SIDES if s in numbers):
        n = numbers[side]
        ppl = humanize.perplexity(n.get("perplexity"))
        if side != "original":
            ppl += f" ({humanize.change(n.get('perplexity'), base.get('perplexity'))})"
        prob = n.get("mmlu_prob_correct")
        rows.append({"Model": SIDE_LABELS[side], "Layers": str(layers.get(side, humanize.MISSING)),
                     "Perplexity": ppl,
                     "MMLU P(correct letter)": humanize.percent(prob) if prob is not None else humanize.MISSING,
                     "Speed": humanize.tokens_per_s(n.get("tokens_per_s"), n.get("tokens_per_s_spread"))})
    return pd.DataFrame(rows)


def gap_recovered(numbers: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The fraction of the log-perplexity gap (pruned over original) that healing closed: 1 = as good as
    the original, 0 = no better than pruned, negative = worse. None when it cannot be said."""
    try:
        o, p, h = (float(numbers[s]["perplexity"]) for s in SIDES)
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (o, p, h)) or p <= o:
        return None
    return (math.log(p) - math.log(h)) / (math.log(p) - math.log(o))


__all__ = [
    "CONTROL_LABELS", "DEMO_SECONDS", "LOSS_CHOICES", "LOSS_LABELS", "MMLU_PER_SUBJECT", "SIDES", "SIDE_LABELS",
    "TARGET_CHOICES", "TARGET_LABELS", "comparison_frame", "gap_recovered", "heal_config", "measure_three",
]
