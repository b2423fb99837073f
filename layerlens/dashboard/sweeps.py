"""The Evaluate page's sweep: its settings (which the share link carries) and how long it will take.

The time is estimated from measured seconds, never promised: a *timing* is what one decoder layer costs
per token on this machine, measured either by the sweeps already run on this model (persisted by
:mod:`layerlens.dashboard.store`) or, before the first, by a quick calibration (one short perplexity
window, timed three times, on the original model). The sweep's own schedule
(:func:`layerlens.prefix_reuse.schedule_reuse`) says how many layer passes each evaluation runs, so the
estimate knows that shared prefixes are computed once; the unembedding counts as the layers it costs;
MMLU counts its real (padded) tokens. bench/bench_sweep_estimate.py compares estimates with real sweeps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import LayerLensError
from ..evaluation import DEFAULT_MMLU_BATCH, MMLUTask, PerplexityTask, harness_max_length, plain_forward
from ..prefix_reuse import schedule_reuse
from ..runs import stable_key
from ..sweep import effective_plan

RATIO_CHOICES = tuple(round(0.05 * i, 2) for i in range(0, 15))
RUN_ON = ("this process", "local Ray", "cluster address")  # where the Evaluate page's sweep computes its points


@dataclass(frozen=True)
class SweepSettings:
    """What the Evaluate page sweeps (its widgets, and the ``ev_*`` parameters of a share link)."""

    strategies: tuple[str, ...] = ("bi", "reverse")
    ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
    windows: int = 8
    seq_len: int = 256
    mmlu: bool = True
    mmlu_per_subject: int = 1
    subjects: tuple[str, ...] = ()
    include_current: bool = True
    heal_seconds: float = 0.0  # heal every pruned point for this long (0: off), a healed row beside each
    tasks: str = ""  # lm-eval task names / local task YAML paths, comma-separated ("task/metric" columns)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heal_seconds", float(self.heal_seconds))
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "subjects", tuple(self.subjects))


@dataclass(frozen=True)
class SweepTiming:
    """What one decoder layer costs per token on this machine, measured on the original model.

    ``layer_token_s``: seconds per token per decoder layer; ``head``: the unembedding's cost in decoder
    layers (perplexity scores every position, MMLU only the answer letter's); ``source`` says where the
    figure comes from ("calibration" or "earlier sweeps"); ``eval_tokens``: how many held-out tokens there
    are, so windows beyond what the text holds are not counted.
    """

    layer_token_s: float
    head: float = 0.0
    source: str = "calibration"
    eval_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"layer_token_s": self.layer_token_s, "head": self.head, "source": self.source,
                "eval_tokens": self.eval_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepTiming:
        return cls(float(d["layer_token_s"]), float(d.get("head", 0.0)), str(d.get("source", "calibration")),
                   d.get("eval_tokens"))


@dataclass(frozen=True)
class SweepEstimate:
    """Estimated seconds of every evaluation a sweep computes, in the order the sweep runs them
    (perplexity first, then MMLU; each in the sweep's schedule order)."""

    unit_seconds: tuple[float, ...]
    timing: SweepTiming

    @property
    def seconds(self) -> float:
        return float(sum(self.unit_seconds))

    def left(self, done: int, elapsed: float) -> float:
        """Seconds left after the first ``done`` evaluations took ``elapsed`` s: the rest of the estimate,
        scaled by how fast the finished ones went against their own estimate."""
        est_done = sum(self.unit_seconds[:done])
        rest = sum(self.unit_seconds[done:])
        if done <= 0 or est_done <= 0:
            return max(rest - elapsed, 0.0)
        return rest * elapsed / est_done


def head_layers(hidden: int, vocab: int, per_layer_params: Sequence[int]) -> float:
    """The unembedding's cost in decoder layers (a ``hidden`` x ``vocab`` product per scored token): on a
    small model it costs as much as several layers."""
    mean = sum(per_layer_params) / max(len(per_layer_params), 1)
    return hidden * vocab / mean if mean > 0 else 0.0


def unique_plans(plans: Sequence[Any]) -> list[Any]:
    """One plan per distinct pruned model, as the sweep computes them (strategy names do not count)."""
    out: dict[str, Any] = {}
    for plan in plans:
        out.setdefault(stable_key(effective_plan(plan)), plan)
    return list(out.values())


def mmlu_tokens(model: Any, tokenizer: Any, questions: Any) -> int:
    """Tokens (padding included) the sweep's MMLU evaluation runs through the model per plan."""
    task = MMLUTask(tokenizer, questions, batch_size=DEFAULT_MMLU_BATCH, max_length=harness_max_length(model, tokenizer))
    return sum(int(b.input_ids.numel()) for b in task.batches)


def estimate(timing: SweepTiming, plans: Sequence[Any], *, windows: int, seq_len: int,
             mmlu_tokens: int = 0) -> SweepEstimate:
    """Seconds for every evaluation a sweep of ``plans`` computes (as if none was read back).

    Each evaluation costs the layer passes the sweep's own prefix-reuse schedule gives it, plus the
    unembedding for perplexity (every position is scored), per token of its data.
    """
    steps = schedule_reuse(unique_plans(plans), None)
    if timing.eval_tokens:
        windows = max(min(windows, timing.eval_tokens // max(seq_len, 1)), 1)
    units: list[float] = []
    if windows > 0:
        units += [(s.layer_passes + timing.head) * windows * seq_len * timing.layer_token_s for s in steps]
    if mmlu_tokens > 0:
        units += [s.layer_passes * mmlu_tokens * timing.layer_token_s for s in steps]
    return SweepEstimate(tuple(units), timing)


CALIBRATION_TOKENS = 128


def calibrate(model: Any, tokenizer: Any, ppl_texts: Any, *, num_layers: int, head: float,
              seq_len: int = CALIBRATION_TOKENS, repeats: int = 3) -> SweepTiming:
    """Time one perplexity window (at most :data:`CALIBRATION_TOKENS` tokens) on the original model: the
    median of ``repeats`` passes, as one pass on a busy machine can take several times the usual."""
    n = min(seq_len, CALIBRATION_TOKENS)
    everything = PerplexityTask(tokenizer, ppl_texts, seq_len=n, batch_size=1, max_windows=None)
    one = PerplexityTask(tokenizer, ppl_texts, seq_len=n, batch_size=1, max_windows=1)
    forward = plain_forward(model)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        one.run(forward)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return SweepTiming(seconds / (max(int(one.windows.numel()), 1) * (num_layers + head)), head, "calibration",
                       int(everything.windows.numel()))


def measured(prior: SweepEstimate, seconds: float, computed: int) -> SweepTiming | None:
    """The timing a finished sweep measured: the prior timing scaled by how long its ``computed``
    evaluations really took against their estimate (None when nothing was computed)."""
    est = sum(prior.unit_seconds[:computed])
    if computed <= 0 or est <= 0 or seconds <= 0:
        return None
    t = prior.timing
    return replace(t, layer_token_s=t.layer_token_s * seconds / est, source="earlier sweeps")


def rough_seconds(seconds: float) -> str:
    """An estimated duration, rounded as estimates deserve: "40 s", "3 min", "1 h 05 min" (a measured
    one is :func:`layerlens.humanize.seconds`)."""
    if seconds < 90:
        return f"{max(round(seconds / 5) * 5, 5):.0f} s" if seconds >= 10 else f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def sweep_executor(run_on: str, address: str, info: Any) -> Any:
    """The executor for where the Evaluate page runs a sweep (:data:`RUN_ON`): None for this process, else a
    :class:`layerlens.distributed.RayExecutor` (a local Ray, or the cluster at ``address``) whose workers
    load the same model (``info``: the loaded model's :class:`layerlens.loading.ModelInfo`). A local Ray the
    dashboard starts stays up for the next sweep; the actors stop with each sweep."""
    if run_on not in RUN_ON:
        raise LayerLensError(f"`run_on` must be one of {', '.join(RUN_ON)} (got {run_on!r}).")
    if run_on == RUN_ON[0]:
        return None
    from ..distributed import LOCAL, ModelSpec, RayExecutor, require_ray  # only when a sweep goes to Ray

    require_ray()
    if run_on == RUN_ON[2] and not address.strip():
        raise LayerLensError("Give the Ray cluster's address (e.g. ray://head-node:10001, as printed by `ray start` "
                             "on the head node), or run on this process or a local Ray.")
    return RayExecutor(ModelSpec.of(info), LOCAL if run_on == RUN_ON[1] else address.strip(), shutdown=False)


__all__ = ["RATIO_CHOICES", "RUN_ON", "sweep_executor", "SweepEstimate", "SweepSettings", "SweepTiming", "calibrate", "rough_seconds",
           "estimate", "head_layers", "measured", "mmlu_tokens", "unique_plans"]
