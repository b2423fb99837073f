"""A quick before/after look at a plan: perplexity on a few held-out windows, and timed greedy generation.

Seconds on a CPU, for a first impression (the dashboard shows it after Apply and on the Summary page);
``layerlens sweep`` / ``evaluate`` give the full numbers. The original model is never modified: surgery
returns a new model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from . import surgery
from .data import TextSet, load_texts
from .evaluation import perplexity

QUICK_WINDOWS = 4  # held-out perplexity windows
QUICK_SEQ_LEN = 128  # tokens per window
QUICK_NEW_TOKENS = 16  # greedy tokens generated (and timed) per model


@dataclass(frozen=True)
class QuickNumbers:
    """One model's side: perplexity, generation speed and text; ``surgery_s`` only for the pruned model."""

    perplexity: float
    tokens_per_s: float
    generation: str
    surgery_s: float | None = None


@dataclass(frozen=True)
class QuickComparison:
    """The original and the pruned model measured alike (:func:`quick_compare`)."""

    original: QuickNumbers
    pruned: QuickNumbers
    windows: int = QUICK_WINDOWS
    seq_len: int = QUICK_SEQ_LEN
    new_tokens: int = QUICK_NEW_TOKENS

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{"original": {...}, "pruned": {...}}``, each side with the settings it was measured with."""
        common = {"windows": self.windows, "seq_len": self.seq_len, "new_tokens": self.new_tokens}
        o, p = self.original, self.pruned
        return {"original": common | {"perplexity": o.perplexity, "tokens_per_s": o.tokens_per_s,
                                      "generation": o.generation},
                "pruned": common | {"perplexity": p.perplexity, "tokens_per_s": p.tokens_per_s,
                                    "generation": p.generation, "surgery_s": p.surgery_s}}


def eval_texts() -> TextSet:
    """The held-out text (plays disjoint from the calibration plays)."""
    return load_texts("default", role="eval")


def quick_perplexity(model: Any, tokenizer: Any) -> float:
    """Perplexity on :data:`QUICK_WINDOWS` held-out windows of :data:`QUICK_SEQ_LEN` tokens."""
    res = perplexity(model, tokenizer, eval_texts(), seq_len=QUICK_SEQ_LEN, max_windows=QUICK_WINDOWS)
    return float(res.perplexity)


def generation_speed(model: Any, tokenizer: Any, enc: dict, new_tokens: int) -> tuple[float, str]:
    """(tokens per second, generated text) of exactly ``new_tokens`` greedy tokens after ``enc``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        dt = time.perf_counter() - t
    n_new = int(out.shape[1] - enc["input_ids"].shape[1])
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return (n_new / dt if dt > 0 else float("nan")), text


def quick_compare(model: Any, tokenizer: Any, plan: Any, prompt: str, *,
                  perplexity_before: float | None = None) -> QuickComparison:
    """Apply ``plan`` to a new model and compare it with ``model``: :func:`quick_perplexity` of both, and
    greedy generation of ``prompt`` by both, timed back to back (after a one-token warm-up of each) so
    machine load hits both alike. ``perplexity_before``: the original's quick perplexity when the caller
    already has it (it depends on the model only, not on the plan)."""
    if perplexity_before is None:
        perplexity_before = quick_perplexity(model, tokenizer)
    t = time.perf_counter()
    pruned = surgery.apply_plan(model, plan)  # looked up at call time: benchmarks count the calls
    surgery_s = time.perf_counter() - t
    ppl = quick_perplexity(pruned, tokenizer)
    device = next(pruned.parameters()).device
    enc = {k: v.to(device) for k, v in tokenizer(prompt, return_tensors="pt").items()}
    for m in (model, pruned):  # warm-up
        generation_speed(m, tokenizer, enc, 1)
    speed_o, text_o = generation_speed(model, tokenizer, enc, QUICK_NEW_TOKENS)
    speed_p, text_p = generation_speed(pruned, tokenizer, enc, QUICK_NEW_TOKENS)
    return QuickComparison(original=QuickNumbers(perplexity_before, speed_o, text_o),
                           pruned=QuickNumbers(ppl, speed_p, text_p, surgery_s=surgery_s))


__all__ = [
    "QUICK_NEW_TOKENS", "QUICK_SEQ_LEN", "QUICK_WINDOWS", "QuickComparison", "QuickNumbers", "eval_texts",
    "generation_speed", "quick_compare", "quick_perplexity",
]
