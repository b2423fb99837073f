"""A quick before/after look at a plan: perplexity on a few held-out windows, and timed greedy generation.

Seconds on a CPU, for a first impression (the dashboard shows it after Apply and on the Summary page);
``layerlens sweep`` / ``evaluate`` give the full numbers. The original model is never modified: surgery
returns a new model.

Speed is the MEDIAN of several timed generations per model after an untimed warm-up, the two models'
runs interleaved (rounds alternate o,p / p,o) so machine load drifts over both alike, with the spread (the
interquartile range) and what was measured (tokens, prompt length, device, dtype, threads). On a CPU the
timing runs with one core left free (:func:`quick_threads`): on a shared 2-core machine a second OpenMP
thread that waits for a busy core makes every small op of a one-token decode step cost milliseconds
(bench/bench_quick.py: generation 5x slower with 2 threads than with 1 under load). The pruned model's
perplexity runs only from its first changed layer, on the original's recorded layer inputs
(:class:`Baseline`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import surgery
from .adapters import decoder_layers
from .data import TextSet, check_seq_len, load_texts, pad_id
from .errors import LayerLensError
from .evaluation import PerplexityTask, check_window, model_device, plain_forward
from .loading import dtype_name, max_positions
from .prefix_reuse import first_affected_layer, recording, state_bytes, tail_forward

QUICK_WINDOWS = 4  # held-out perplexity windows
QUICK_SEQ_LEN = 128  # tokens per window
QUICK_NEW_TOKENS = 16  # greedy tokens of the side-by-side text (the untimed warm-up run)
BASELINE_MAX_BYTES = 256 * 2**20  # the original's layer inputs on the quick windows are kept up to this size

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, label)``: ``label`` names the step that starts now (the library's convention)."""


@dataclass(frozen=True)
class SpeedSettings:
    """How generation speed is timed: ``runs`` timed greedy generations of ``new_tokens`` tokens per model
    after the untimed warm-up; ``threads`` CPU threads while timing (None: :func:`quick_threads`)."""

    runs: int = 5
    new_tokens: int = 6
    threads: int | None = None

    def key(self) -> tuple[int, int, int | None]:
        """What a cached figure depends on (with the model and the prompt)."""
        return (self.runs, self.new_tokens, self.threads)


QUICK_SPEED = SpeedSettings()


@dataclass(frozen=True)
class Speed:
    """Generation speed of one model: tokens/s of every timed run, and what was measured."""

    runs: tuple[float, ...]  # tokens/s of each timed run, in the order run
    new_tokens: int  # tokens generated per timed run
    prompt_tokens: int
    device: str
    dtype: str
    threads: int  # torch intra-op threads while timing
    warmup_runs: int = 1

    @property
    def median(self) -> float:
        return float(statistics.median(self.runs))

    @property
    def quartiles(self) -> tuple[float, float]:
        """(Q1, Q3) of the runs (inclusive method: within min..max, exact for 5 runs)."""
        if len(self.runs) < 2:
            return self.runs[0], self.runs[0]
        q1, _, q3 = statistics.quantiles(self.runs, n=4, method="inclusive")
        return float(q1), float(q3)

    @property
    def plus_minus(self) -> float:
        """Half the interquartile range: the "±" shown next to the median."""
        q1, q3 = self.quartiles
        return (q3 - q1) / 2

    def to_dict(self) -> dict[str, Any]:
        """Flat keys, as each side of :meth:`QuickComparison.to_dict` carries them."""
        q1, q3 = self.quartiles
        return {"tokens_per_s": self.median, "tokens_per_s_spread": self.plus_minus,
                "spread": "half the interquartile range", "tokens_per_s_q1": q1, "tokens_per_s_q3": q3,
                "tokens_per_s_min": min(self.runs), "tokens_per_s_max": max(self.runs),
                "tokens_per_s_runs": list(self.runs), "runs": len(self.runs), "warmup_runs": self.warmup_runs,
                "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens, "device": self.device,
                "dtype": self.dtype, "threads": self.threads}


@dataclass(frozen=True)
class QuickNumbers:
    """One model's side: perplexity, generation speed and text; ``surgery_s`` only for the pruned model."""

    perplexity: float
    tokens_per_s: float  # the median of speed.runs
    generation: str
    surgery_s: float | None = None
    speed: Speed | None = None


@dataclass(frozen=True)
class QuickComparison:
    """The original and the pruned model measured alike (:func:`quick_compare`).

    ``speedup``: pruned ÷ original tokens/s, the median of the per-round ratios when the runs were
    interleaved in this call (``paired``), else the ratio of the medians (original figure from a cache).
    """

    original: QuickNumbers
    pruned: QuickNumbers
    speedup: float
    paired: bool
    windows: int = QUICK_WINDOWS
    seq_len: int = QUICK_SEQ_LEN
    text_tokens: int = QUICK_NEW_TOKENS

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{"original": {...}, "pruned": {...}}``, each side flat: perplexity and the windows it was
        measured on; the generated text and its length; the median speed with its spread and what was
        timed (:meth:`Speed.to_dict`: ``new_tokens`` per timed run, ``runs``, ``prompt_tokens``, ...)."""

        def side(n: QuickNumbers) -> dict[str, Any]:
            speed = n.speed.to_dict() if n.speed else {"tokens_per_s": n.tokens_per_s}
            return {"windows": self.windows, "seq_len": self.seq_len, "perplexity": n.perplexity,
                    "generation": n.generation, "text_tokens": self.text_tokens} | speed

        return {"original": side(self.original),
                "pruned": side(self.pruned) | {"surgery_s": self.pruned.surgery_s, "speedup": self.speedup,
                                               "speedup_paired": self.paired}}


def eval_texts() -> TextSet:
    """The held-out text (plays disjoint from the calibration plays)."""
    return load_texts("default", role="eval")


_TASKS: weakref.WeakKeyDictionary[Any, PerplexityTask] = weakref.WeakKeyDictionary()


def quick_task(tokenizer: Any) -> PerplexityTask:
    """The quick windows as a :class:`PerplexityTask` (all windows in one batch), built once per tokenizer:
    tokenizing the whole held-out text took 0.65 s of every Apply. A task is never changed by running it."""
    try:
        task = _TASKS.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        task = None
    if task is None:
        task = PerplexityTask(tokenizer, eval_texts(), seq_len=QUICK_SEQ_LEN, batch_size=QUICK_WINDOWS,
                              max_windows=QUICK_WINDOWS)
        with contextlib.suppress(TypeError):
            _TASKS[tokenizer] = task
    return task


@dataclass(frozen=True)
class Baseline:
    """The original model on the quick windows: its perplexity, and the input of each decoder layer per
    batch (none when above :data:`BASELINE_MAX_BYTES`). A pruned model's layers before the plan's first
    change are the original's, so its perplexity runs only from there (the same number, bit for bit)."""

    perplexity: float
    layer_inputs: tuple[tuple[torch.Tensor, ...], ...] = ()


def quick_baseline(model: Any, tokenizer: Any) -> Baseline:
    """:class:`Baseline` of ``model``, recorded on a private view (``model`` never carries a hook)."""
    check_window(model, QUICK_SEQ_LEN)
    task = quick_task(tokenizer)
    view = surgery.private_view(model)
    layers = decoder_layers(view)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    elem = next(model.parameters()).element_size()
    keep = isinstance(hidden, int) and state_bytes(task, hidden, elem) * len(layers) <= BASELINE_MAX_BYTES
    recorded: dict[int, list[torch.Tensor]] = {}
    with recording(dict(enumerate(layers)) if keep else {}, recorded):
        ppl = float(task.run(plain_forward(view)).perplexity)
    return Baseline(ppl, tuple(tuple(recorded[i]) for i in range(len(layers))) if keep else ())


def quick_perplexity(model: Any, tokenizer: Any, *, baseline: Baseline | None = None, plan: Any = None) -> float:
    """Perplexity on :data:`QUICK_WINDOWS` held-out windows of :data:`QUICK_SEQ_LEN` tokens (one batch).
    With the original's ``baseline`` and the ``plan`` that made ``model`` from it, only the layers from the
    plan's first change run (on a private view of ``model``)."""
    check_window(model, QUICK_SEQ_LEN)
    task = quick_task(tokenizer)
    start = first_affected_layer(plan) if plan is not None else 0
    # the tail needs a layer to run: a plan that only drops the last layers falls back to the full pass
    if baseline is not None and 0 < start < min(len(baseline.layer_inputs), len(decoder_layers(model))):
        view = surgery.private_view(model)
        return float(task.run(tail_forward(view, start, baseline.layer_inputs[start])).perplexity)
    return float(task.run(plain_forward(model)).perplexity)


def quick_threads() -> int:
    """CPU threads for the quick numbers: torch's setting, but one core left free for the server, the
    browser and other sessions (1 on a 2-core machine), so OpenMP never waits for a busy core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - 1))


_TIMING = threading.RLock()


@contextlib.contextmanager
def timing_threads(device: Any, threads: int | None = None) -> Iterator[int]:
    """Serialize timed work (two timings at once would disturb each other) and, on a CPU, run it with
    ``threads`` (default :func:`quick_threads`) torch threads, restored afterwards. Yields the count."""
    with _TIMING:
        old = torch.get_num_threads()
        if torch.device(device).type != "cpu":
            yield old
            return
        n = threads or quick_threads()
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_speed(model: Any, tokenizer: Any, enc: dict, new_tokens: int) -> tuple[float, str]:
    """(tokens per second, generated text) of exactly ``new_tokens`` greedy tokens after ``enc``."""
    device = model_device(model)
    with torch.inference_mode():
        _sync(device)
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_id(tokenizer))
        _sync(device)
        dt = time.perf_counter() - t
    n_new = int(out.shape[1] - enc["input_ids"].shape[1])
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return (n_new / dt if dt > 0 else float("nan")), text


def _noop(done: int, total: int, label: str) -> None:
    return None


def measure_generation(models: Sequence[Any], names: Sequence[str], tokenizer: Any, prompt: str,
                       settings: SpeedSettings = QUICK_SPEED, progress: ProgressFn | None = None,
                       done: int = 0, total: int | None = None) -> list[tuple[Speed, str]]:
    """(speed, text) of each model: one untimed warm-up generating the :data:`QUICK_NEW_TOKENS`-token text,
    then ``settings.runs`` timed rounds in which every model generates ``settings.new_tokens`` tokens, the
    order rotated each round (o,p then p,o) so load drift hits all models alike."""
    if settings.runs < 1 or settings.new_tokens < 1:
        raise ValueError("SpeedSettings needs at least one run of at least one token")
    progress = progress or _noop
    total = total if total is not None else len(models) * (1 + settings.runs)
    device = model_device(models[0])
    enc = {k: v.to(device) for k, v in tokenizer(prompt, return_tensors="pt").items()}
    if enc["input_ids"].shape[1] == 0:
        raise LayerLensError("The prompt is empty; type a few words for both models to continue.")
    dtype = dtype_name(next(models[0].parameters()).dtype)
    runs: list[list[float]] = [[] for _ in models]
    texts = []
    with timing_threads(device, settings.threads) as threads:
        for name, m in zip(names, models, strict=True):
            progress(done, total, f"{name}: warm-up, generating the text")
            texts.append(generation_speed(m, tokenizer, enc, QUICK_NEW_TOKENS)[1])
            done += 1
        for r in range(settings.runs):
            order = [(r + i) % len(models) for i in range(len(models))]
            for i in order:
                progress(done, total, f"Timing generation: run {r + 1} of {settings.runs} ({names[i]})")
                runs[i].append(generation_speed(models[i], tokenizer, enc, settings.new_tokens)[0])
                done += 1
    prompt_tokens = int(enc["input_ids"].shape[1])
    return [(Speed(tuple(r), settings.new_tokens, prompt_tokens, str(device), dtype, threads), text)
            for r, text in zip(runs, texts, strict=True)]


def measure_original(model: Any, tokenizer: Any, prompt: str, *, baseline: Baseline | None = None,
                     speed: SpeedSettings = QUICK_SPEED, progress: ProgressFn | None = None) -> QuickNumbers:
    """The original's side alone (perplexity, timed generation, text): what a later
    :func:`quick_compare` takes as ``original``. The dashboard measures it while the user is still choosing a
    plan, so the first Apply only measures the pruned model."""
    progress = progress or _noop
    total = int(baseline is None) + 1 + speed.runs
    with timing_threads(model_device(model), speed.threads):
        if baseline is None:
            progress(0, total, f"Original model: perplexity on {QUICK_WINDOWS} windows")
            baseline = quick_baseline(model, tokenizer)
        (speed_o, text_o), = measure_generation([model], ["Original model"], tokenizer, prompt, speed, progress,
                                                total - 1 - speed.runs, total)
    progress(total, total, "Done")
    return QuickNumbers(baseline.perplexity, speed_o.median, text_o, speed=speed_o)


def quick_compare(model: Any, tokenizer: Any, plan: Any, prompt: str, *, baseline: Baseline | None = None,
                  original: QuickNumbers | None = None, speed: SpeedSettings = QUICK_SPEED,
                  progress: ProgressFn | None = None) -> QuickComparison:
    """Apply ``plan`` to a new model and compare it with ``model``: :func:`quick_perplexity` of both, and
    greedy generation of ``prompt`` by both (:func:`measure_generation`, the runs interleaved).

    ``baseline``: :func:`quick_baseline` of ``model`` when the caller keeps it (it depends on the model
    only); measured here otherwise. ``original``: the original's whole side from an earlier call with the
    same prompt and settings (a cache): then only the pruned model is measured. ``progress(done, total,
    label)`` is called before every step (surgery, each perplexity, each generation run) and at the end."""
    progress = progress or _noop
    paired = original is None
    n_models = 2 if paired else 1
    total = 2 + int(baseline is None) + n_models * (1 + speed.runs)
    done = 0
    progress(done, total, "Pruning (surgery on a new model)")
    t = time.perf_counter()
    pruned = surgery.apply_plan(model, plan)  # looked up at call time: benchmarks count the calls
    surgery_s = time.perf_counter() - t
    done += 1
    device = model_device(pruned)
    with timing_threads(device, speed.threads):
        if baseline is None:
            progress(done, total, f"Original model: perplexity on {QUICK_WINDOWS} windows")
            baseline = quick_baseline(model, tokenizer)
            done += 1
        progress(done, total, f"Pruned model: perplexity on {QUICK_WINDOWS} windows")
        ppl = quick_perplexity(pruned, tokenizer, baseline=baseline, plan=plan)
        done += 1
        models, names = ([model, pruned], ["Original model", "Pruned model"]) if paired \
            else ([pruned], ["Pruned model"])
        measured = measure_generation(models, names, tokenizer, prompt, speed, progress, done, total)
    progress(total, total, "Done")
    speed_p, text_p = measured[-1]
    if original is None:
        speed_o, text_o = measured[0]
        original = QuickNumbers(baseline.perplexity, speed_o.median, text_o, speed=speed_o)
        speedup = float(statistics.median(p / o for p, o in zip(speed_p.runs, speed_o.runs, strict=True)))
    else:
        speedup = speed_p.median / original.tokens_per_s if original.tokens_per_s > 0 else float("nan")
    return QuickComparison(original=original,
                           pruned=QuickNumbers(ppl, speed_p.median, text_p, surgery_s=surgery_s, speed=speed_p),
                           speedup=speedup, paired=paired)


def layerwise_quick(lw: Any, plan: Any, progress: ProgressFn | None = None) -> dict[str, dict[str, Any]]:
    """Apply's quick numbers for a model that runs layer by layer (:class:`layerlens.layerwise.LayerwiseModel`):
    :func:`quick_perplexity`'s windows scored on the original and on the model pruned by ``plan``, in one pass
    over the weights, plus mean token KL(original ‖ pruned) and top-1 agreement. Shaped like
    :meth:`QuickComparison.to_dict`; generation speed and text need the whole model in memory, so they are
    None (``generation_measured`` False), never estimated."""
    from .plans import PrunePlan

    progress = progress or _noop
    check_seq_len(QUICK_SEQ_LEN, max_positions(lw.config))
    task = copy.copy(quick_task(lw.tokenizer))  # the very windows of the in-memory check; the cached task
    task.kl, task.reference = True, None  # stays unchanged (the reference goes on this copy)
    progress(0, lw.num_layers, f"Original and pruned model, layer by layer: perplexity on {QUICK_WINDOWS} windows")
    (original, pruned), = lw.evaluate([task], [PrunePlan(lw.num_layers, "remove"), plan], progress=progress)
    progress(lw.num_layers, lw.num_layers, "Done")
    same = {"windows": QUICK_WINDOWS, "seq_len": QUICK_SEQ_LEN, "generation": None, "tokens_per_s": None,
            "generation_measured": False, "execution": "layerwise"}
    return {"original": same | {"perplexity": float(original.perplexity)},
            "pruned": same | {"perplexity": float(pruned.perplexity), "kl": pruned.kl,
                              "top1_agreement": pruned.top1_agreement, "surgery_s": None, "speedup": None,
                              "speedup_paired": None}}


__all__ = [
    "BASELINE_MAX_BYTES", "QUICK_NEW_TOKENS", "QUICK_SEQ_LEN", "QUICK_SPEED", "QUICK_WINDOWS", "Baseline",
    "ProgressFn", "QuickComparison", "QuickNumbers", "Speed", "SpeedSettings", "eval_texts", "generation_speed", "layerwise_quick",
    "measure_generation", "measure_original", "quick_baseline", "quick_compare", "quick_perplexity", "quick_task",
    "quick_threads",
    "timing_threads",
]
