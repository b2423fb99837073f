"""Perplexity and MMLU scoring of a live model object.

Both evaluations are split in two: a *task* turns the data into a fixed list of token batches (and knows
how to turn the logits of those batches into a result), and a *forward* function turns one batch into
logits. :func:`perplexity` and :func:`mmlu` run a task with the plain forward; :mod:`layerlens.sweep` runs
the same tasks with forwards that reuse cached hidden states, so every number comes from one code path.

Perplexity (GPTQ / ShortGPT protocol): texts joined with ``"\\n\\n"``, tokenized once with the tokenizer's
defaults, cut into non-overlapping windows of ``seq_len`` tokens (tail dropped); perplexity =
exp(mean NLL over every predicted token, ``seq_len - 1`` per window), log-softmax in float32, sums in
float64.

MMLU: exactly lm-evaluation-harness's ``mmlu`` task (default variant, v0.4.x, checked against 0.4.13):

* description ``"The following are multiple choice questions (with answers) about {subject with
  spaces}.\\n\\n"``;
* each shot ``"{question.strip()}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n"`` (target
  delimiter ``" "``, few-shot delimiter ``"\\n\\n"``; the first k dev questions of the subject, the
  ``first_n`` sampler, shared by every question of the subject; when the examples come from the scored
  split itself (the bundled set has no dev split) a question that is one of them is left out of the
  scoring, see :class:`MMLUTask`);
* the question ``"{question.strip()}\\nA. ...\\nD. {d}\\nAnswer:"``; choices are not stripped;
* continuations ``" A"``, ``" B"``, ``" C"``, ``" D"``; the prediction is the argmax (first on ties) of
  their log-likelihoods; accuracy is the micro average (the harness's group aggregation weighted by size).

Tokenization follows HFLM's ``_encode_pair``: ``whole = enc(ctx + cont)``, ``ctx_enc = enc(ctx)``,
``cont_enc = whole[len(ctx_enc):]``, with ``enc`` = ``tokenizer.encode`` with the tokenizer's default
special tokens (so a BOS is added exactly when the tokenizer adds one by default: Llama-2 style yes,
GPT-2/SmolLM2 no; HFLM's ``add_bos_token`` is left at its default ``None``). The model sees
``(ctx_enc + cont_enc)[-(max_length + 1):][:-1]`` with ``max_length`` resolved like HFLM (config
``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else the tokenizer's ``model_max_length``, else
2048). When all four continuations are one token, one forward of the context scores the question (the
logits at its last position); otherwise each letter is scored as the sum of its tokens' log-probabilities.
With few-shot prompts the tokens every row of a subject shares run once into a KV cache (see :class:`MMLUTask`).

KL to the original: :meth:`PerplexityTask.keep_reference` runs the original model once and keeps the input
of its output head per batch; every later run recomputes the original logits from it (same head, so
bit-identical to the original forward) and adds the mean token KL(original ‖ model) and top-1 agreement.

Why one module over ~400 lines: perplexity and MMLU share the task/forward split that sweeps reuse
with cached hidden states; one module keeps that contract in one place.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import check_seq_len, pad_id
from .errors import DataError, LayerLensError
from .loading import max_positions
from .questions import LETTERS, Question, QuestionSet, as_questions
from .runs import stable_key

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, label)``, called after each batch (or sweep point)."""

DEFAULT_SEQ_LEN = 256
DEFAULT_PPL_BATCH = 4
DEFAULT_MMLU_BATCH = 8
HARNESS_DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656


# --------------------------------------------------------------------------------------------------------
# Batches and the plain forward
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalBatch:
    """One model input. ``keep``: the positions whose logits are needed (None: all).

    ``prefix`` (1-D token ids, shared by every row) comes before each row: the forward runs it once into a
    KV cache (kept while consecutive batches share ``prefix_key``) and only ``input_ids`` on top of it;
    ``attention_mask`` and ``position_ids`` then cover the rows' own tokens (positions start at
    ``len(prefix)``), and logits are the rows'.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    prefix_key: Any = None

    @property
    def num_tokens(self) -> int:
        if self.attention_mask is None:
            return int(self.input_ids.numel())
        return int(self.attention_mask.sum())


Forward = Callable[[int, EvalBatch], torch.Tensor]
"""``forward(batch_index, batch) -> float32 logits [B, len(keep) or W, V]``."""


NONFINITE = ("The model produced NaN/inf logits (usually float16 overflow, or a pruned model that diverged); "
             "re-run with `dtype=float32` or bfloat16.")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (earlier, and models not yet renamed)."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def prefix_cache(model: torch.nn.Module, prefix: torch.Tensor) -> Any:
    """The KV cache of ``prefix`` (1-D ids) for one row (only its last position's logits are computed)."""
    kwargs: dict[str, Any] = {"input_ids": prefix[None].to(model_device(model)), "use_cache": True}
    if _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    with torch.inference_mode():
        out = model(**kwargs)
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def batched_cache(cache: Any, rows: int) -> Any:
    """A fresh cache object over the same tensors, broadcast to ``rows`` rows (no copy): a forward appends
    to the copy, never to ``cache`` (layers concatenate, so the expanded views are never written)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        mine = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            mine.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
            mine.values = layer.values.expand(rows, *layer.values.shape[1:])
        out.layers.append(mine)
    return out


class PrefixCaches:
    """The KV cache of the current batch's shared prefix, computed once per ``prefix_key`` run of batches
    (one subject's few-shot prefix) and dropped when the key changes: one prefix in memory at a time."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.key, self.cache = model, None, None

    def past_for(self, batch: EvalBatch) -> Any:
        if batch.prefix is None:
            return None
        if self.cache is None or batch.prefix_key != self.key:
            self.cache = None  # free the previous subject's cache before computing the next
            self.key, self.cache = batch.prefix_key, prefix_cache(self.model, batch.prefix)
        return batched_cache(self.cache, batch.input_ids.shape[0])


def model_logits(model: torch.nn.Module, batch: EvalBatch, past: Any = None) -> torch.Tensor:
    """The model's logits for ``batch`` (only at ``batch.keep`` when given), as float32.

    A batch with a ``prefix`` needs ``past``, its KV cache for the batch's rows (:class:`PrefixCaches`).
    """
    device = model_device(model)
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids.to(device), "use_cache": False}
    if batch.prefix is not None:
        if past is None:
            raise LayerLensError("This batch continues a cached prefix; run it through plain_forward(model).")
        kwargs.update({_cache_kwarg(model): past, "use_cache": True})
    if batch.attention_mask is not None:
        mask = batch.attention_mask
        if batch.prefix is not None:
            mask = torch.cat([torch.ones(mask.shape[0], len(batch.prefix), dtype=mask.dtype), mask], dim=1)
        kwargs["attention_mask"] = mask.to(device)
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids.to(device)
    native_keep = batch.keep is not None and _supports_logits_to_keep(model)
    if native_keep:
        kwargs["logits_to_keep"] = batch.keep.to(device)  # type: ignore[union-attr]
    with torch.inference_mode():
        logits = model(**kwargs).logits
    if batch.keep is not None and not native_keep:
        logits = logits[:, batch.keep.to(logits.device)]
    return logits.float()


def plain_forward(model: torch.nn.Module) -> Forward:
    """The model as it is now; shared prefixes are cached once per run of batches that share them."""
    prefixes = PrefixCaches(model)

    def forward(_index: int, batch: EvalBatch) -> torch.Tensor:
        return model_logits(model, batch, prefixes.past_for(batch))

    forward.model = model  # type: ignore[attr-defined]  # tasks that need the model itself (the harness)
    return forward


def _tokenizer_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer.encode(text)`` with the tokenizer's defaults (special tokens as it adds them)."""
    return list(tokenizer(text, verbose=False)["input_ids"])


# --------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityResult:
    """``kl``: mean over predicted tokens of KL(original ‖ evaluated) in nats; ``top1_agreement``: the
    fraction of those tokens where both put the highest logit on the same token (None: no reference)."""

    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    max_windows: int | None
    kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "nll": self.nll, "n_tokens": self.n_tokens,
                "n_windows": self.n_windows, "seq_len": self.seq_len, "max_windows": self.max_windows,
                "kl": self.kl, "top1_agreement": self.top1_agreement}


@dataclass(frozen=True)
class Reference:
    """The original model's view of every perplexity batch, kept compactly: the input of its output
    embedding (``[B, W, hidden]`` per batch, on CPU, in the model dtype: ~vocab/hidden times smaller than
    the logits) and the head that turns it into logits. ``logits(i)`` recomputes the original logits of
    batch ``i`` with the very modules of the original forward (bit-identical to them)."""

    head_inputs: tuple[torch.Tensor, ...]
    head: torch.nn.Module
    softcap: float | None

    def logits(self, index: int, device: torch.device) -> torch.Tensor:
        with torch.inference_mode():
            out = self.head(self.head_inputs[index].to(device))
        if self.softcap:  # Gemma-2 style final logit soft-capping, applied by the model after its head
            out = torch.tanh(out / self.softcap) * self.softcap
        return out.float()


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, float | None]:
    """The module that maps the final hidden state to logits, and the model's final logit soft-cap."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise LayerLensError(f"{type(model).__name__} has no output embedding (lm head); KL to the original "
                             "needs a causal language model.")
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    return head, getattr(cfg, "final_logit_softcapping", None)


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(ref ‖ logits) (nats, float64) and top-1 agreement (bool), for ``[..., V]`` inputs."""
    log_p = torch.log_softmax(ref_logits.float(), dim=-1)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).double()
    return kl, ref_logits.argmax(-1) == logits.argmax(-1)


def _texts_of(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    inner = getattr(texts, "texts", texts)  # a data.TextSet
    return [str(t) for t in inner]


def perplexity_windows(tokenizer: Any, texts: Any, seq_len: int = DEFAULT_SEQ_LEN,
                       max_windows: int | None = None) -> torch.Tensor:
    """The ``[n_windows, seq_len]`` token windows the perplexity protocol evaluates."""
    if seq_len < 2:
        raise LayerLensError(f"`seq_len` must be at least 2 (got {seq_len}).")
    if max_windows is not None and max_windows < 1:
        raise LayerLensError(f"`max_windows` must be at least 1 (got {max_windows}).")
    joined = "\n\n".join(_texts_of(texts))
    ids = torch.tensor(_tokenizer_ids(tokenizer, joined), dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"The perplexity text gives only {ids.numel()} tokens, fewer than one window of "
                        f"`seq_len={seq_len}`; use more text or a smaller `seq_len`.")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def check_window(model: torch.nn.Module, seq_len: int) -> None:
    """Refuse a window longer than the model's positions (one sentence naming the limit)."""
    check_seq_len(seq_len, max_positions(model.config))


class PerplexityTask:
    """The windows of one perplexity evaluation, batched; :meth:`run` scores them with any forward."""

    kind = "perplexity"

    def __init__(self, tokenizer: Any, texts: Any, *, seq_len: int = DEFAULT_SEQ_LEN,
                 batch_size: int = DEFAULT_PPL_BATCH, max_windows: int | None = None, kl: bool = False):
        if batch_size < 1:
            raise LayerLensError(f"`batch_size` must be at least 1 (got {batch_size}).")
        self.windows = perplexity_windows(tokenizer, texts, seq_len, max_windows)
        self.seq_len, self.max_windows, self.kl = seq_len, max_windows, kl
        self.batches = [EvalBatch(w) for w in self.windows.split(batch_size)]
        self.reference: Reference | None = None

    def identity(self) -> dict[str, Any]:
        """What is evaluated (not how it is batched): the exact token windows (and whether KL to the
        original is part of the result)."""
        digest = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()[:16]
        return {"kind": self.kind, "seq_len": self.seq_len, "n_windows": len(self.windows), "tokens": digest} | (
            {"kl": True} if self.kl else {})

    def keep_reference(self, original: torch.nn.Module, progress: ProgressFn | None = None) -> Reference:
        """Run ``original`` once over every batch and keep what :meth:`run` needs for KL and agreement.

        Call it with the unpruned model (before any in-place pruning); later runs of any forward compare
        against it. Memory: ``n_tokens x hidden`` in the model dtype (the logits are recomputed per batch).
        """
        head, softcap = output_head(original)
        kept: list[torch.Tensor] = []

        def hook(_module: torch.nn.Module, args: tuple) -> None:
            kept.append(args[0].detach().to("cpu", copy=True))

        handle = head.register_forward_pre_hook(hook)
        try:
            for i, batch in enumerate(self.batches):
                model_logits(original, batch)
                if progress is not None:
                    progress(i + 1, len(self.batches), "original")
        finally:
            handle.remove()
        if len(kept) != len(self.batches):
            raise LayerLensError(f"{type(original).__name__} did not call its output embedding once per forward; "
                                 "KL to the original is not available for this model.")
        self.reference = Reference(tuple(kept), head, softcap)
        return self.reference

    def run(self, forward: Forward, progress: ProgressFn | None = None) -> PerplexityResult:
        """Score every batch with ``forward``; with a kept reference (:meth:`keep_reference`) also the mean
        token KL(original ‖ forward) and top-1 agreement, over the same predicted positions as the NLL."""
        ref = self.reference
        if self.kl and ref is None:
            raise LayerLensError("This perplexity task compares to the original: call keep_reference(model) "
                                 "with the unpruned model first.")
        total_nll, n_tokens, total_kl, agree = 0.0, 0, 0.0, 0
        for i, batch in enumerate(self.batches):
            logits = forward(i, batch)
            # position t predicts token t+1; the last position predicts nothing (ignored, no logits copy)
            targets = torch.full_like(batch.input_ids, -100)
            targets[:, :-1] = batch.input_ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                                  ignore_index=-100, reduction="none")
            total_nll += float(nll.double().sum())
            n_tokens += int((targets != -100).sum())
            if ref is not None:
                ref_logits = ref.logits(i, logits.device)
                for row in range(logits.shape[0]):  # one window at a time: two [W, V] softmaxes in memory
                    kl, same = token_kl(ref_logits[row, :-1], logits[row, :-1])
                    total_kl += float(kl.sum())
                    agree += int(same.sum())
                del ref_logits
            if progress is not None:
                progress(i + 1, len(self.batches), "perplexity")
        mean = total_nll / n_tokens
        if not math.isfinite(mean) or (ref is not None and not math.isfinite(total_kl)):
            raise LayerLensError(NONFINITE)
        return PerplexityResult(perplexity=math.exp(mean), nll=mean, n_tokens=n_tokens,
                                n_windows=len(self.windows), seq_len=self.seq_len, max_windows=self.max_windows,
                                kl=None if ref is None else max(total_kl / n_tokens, 0.0),
                                top1_agreement=None if ref is None else agree / n_tokens)


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Any, seq_len: int = DEFAULT_SEQ_LEN,
               batch_size: int = DEFAULT_PPL_BATCH, max_windows: int | None = None,
               progress: ProgressFn | None = None, original: torch.nn.Module | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (str, list of str, or a TextSet), standard window protocol.

    With ``original`` (the unpruned model ``model`` was made from), the result also has ``kl`` (mean token
    KL(original ‖ model)) and ``top1_agreement``: the original runs once over the same windows first.
    """
    check_window(model, seq_len)
    task = PerplexityTask(tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                          kl=original is not None)
    if original is not None:
        task.keep_reference(original)
    return task.run(plain_forward(model), progress)


# --------------------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------------------


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def format_question(q: Question, with_answer: bool = False) -> str:
    c = q.choices
    text = f"{q.question.strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def mmlu_prompt(question: Question, shots: Sequence[Question] = ()) -> str:
    """The harness's context string for ``question`` (continuations are ``" A"`` ... ``" D"``)."""
    return mmlu_description(question.subject) + "".join(format_question(s, True) for s in shots) \
        + format_question(question)


def rows_prefix_len(ids: Sequence[int], prefix: Sequence[int]) -> int:
    """``len(prefix)`` when ``ids`` starts with ``prefix`` and has a token after it, else 0."""
    n = len(prefix)
    return n if len(ids) > n and list(ids[:n]) == list(prefix) else 0


def fewshot_examples(subject: str, dev: Sequence[Question], k: int) -> list[Question]:
    """The first ``k`` questions of ``subject`` in ``dev`` (the harness's ``first_n`` sampler)."""
    if k == 0:
        return []
    pool = [d for d in dev if d.subject == subject]
    if len(pool) < k:
        raise DataError(f"`shots={k}` needs {k} examples for subject '{subject}' but the dev set has "
                        f"{len(pool)}; lower `shots` or give a larger dev set.")
    return pool[:k]


def select_shots(question: Question, dev: Sequence[Question], k: int) -> list[Question]:
    """The first ``k`` dev questions of the same subject, never the question itself (``first_n``)."""
    if k == 0:
        return []
    pool = [d for d in dev if d.subject == question.subject and d != question]
    if len(pool) < k:
        raise DataError(f"`shots={k}` needs {k} examples for subject '{question.subject}' but the dev set "
                        f"has {len(pool)}; lower `shots` or give a larger dev set.")
    return pool[:k]


def harness_max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """HFLM's ``max_length``: config n_positions / max_position_embeddings / n_ctx, tokenizer, 2048."""
    config = getattr(model, "config", None)
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY and mml < 10**12:
        return int(mml)
    return HARNESS_DEFAULT_MAX_LENGTH


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM ``_encode_pair`` for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tokenizer_ids(tokenizer, context + continuation)
    ctx = _tokenizer_ids(tokenizer, context)
    return ctx, whole[len(ctx):]


@dataclass(frozen=True)
class _Read:
    """Sum of log P(targets) read at ``start..start+len(targets)-1`` of one row."""

    question: int
    letter: int
    start: int
    targets: tuple[int, ...]


@dataclass(frozen=True)
class MMLUResult:
    accuracy: float
    per_subject: dict[str, float]
    n: int
    mean_prob_correct: float
    choices: tuple[int, ...]
    correct: tuple[bool, ...]
    loglikelihoods: tuple[tuple[float, float, float, float], ...]
    subjects: tuple[str, ...]
    shots: int = 0
    n_multi_token: int = 0
    per_subject_n: dict[str, int] = field(default_factory=dict)
    fewshot_excluded: int = 0  # questions left out of the scoring because they are few-shot examples

    def to_dict(self, per_question: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"accuracy": self.accuracy, "per_subject": dict(self.per_subject), "n": self.n,
                             "mean_prob_correct": self.mean_prob_correct, "shots": self.shots,
                             "per_subject_n": dict(self.per_subject_n), "n_multi_token": self.n_multi_token,
                             "fewshot_excluded": self.fewshot_excluded}
        if per_question:
            d["choices"] = list(self.choices)
            d["correct"] = list(self.correct)
            d["loglikelihoods"] = [list(x) for x in self.loglikelihoods]
        return d


class MMLUTask:
    """Tokenized MMLU requests, batched by length; :meth:`run` scores them with any forward.

    ``padding_side`` ("right" or "left") only changes how rows are packed; attention masks and position
    ids make both give the same log-likelihoods (to float rounding).

    Few-shot (``shots`` k > 0): every question of a subject gets the same examples, the first k questions of
    that subject in ``dev`` (the harness's ``first_n`` sampler). A scored question that is itself one of
    them (the bundled set has no dev split, so its examples come from the test set) is left out of the
    scoring: ``excluded`` lists them, and results record how many.

    ``prefix_cache`` (default: on for few-shot): the token ids every row of a subject shares (its
    description and examples: the longest common token prefix, so the split never moves a token boundary)
    run once per subject into a KV cache and only each question's own tokens run on top of it. The model
    still sees exactly the harness's tokens; a row whose prompt is left-truncated to ``max_length`` (so it
    no longer starts with the prefix) runs whole.
    """

    kind = "mmlu"
    MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache

    def __init__(self, tokenizer: Any, questions: QuestionSet | Iterable[Question | Mapping[str, Any]], *,
                 shots: int = 0, dev: QuestionSet | Iterable[Question | Mapping[str, Any]] | None = None,
                 batch_size: int = DEFAULT_MMLU_BATCH, padding_side: str = "right",
                 max_length: int = HARNESS_DEFAULT_MAX_LENGTH, prefix_cache: bool | None = None):
        if batch_size < 1:
            raise LayerLensError(f"`batch_size` must be at least 1 (got {batch_size}).")
        if padding_side not in ("left", "right"):
            raise LayerLensError(f"padding_side must be 'left' or 'right' (got {padding_side!r}).")
        if shots < 0:
            raise LayerLensError(f"`shots` must be 0 or more (got {shots}).")
        questions = as_questions(questions)
        if not questions:
            raise DataError("No MMLU questions to evaluate; check the data and the subject filter.")
        if shots > 0 and dev is None:
            raise DataError(f"`shots={shots}` needs a dev set of examples (e.g. the hub dataset's dev split "
                            "or `dev=FILE`).")
        dev_q = as_questions(dev) if dev is not None else ()
        examples = {s: fewshot_examples(s, dev_q, shots) for s in dict.fromkeys(q.subject for q in questions)}
        self.excluded = tuple(q for q in questions if q in examples[q.subject])
        self.questions = tuple(q for q in questions if q not in examples[q.subject])
        if not self.questions:
            raise DataError(f"Every question is one of its subject's {shots} few-shot examples; give more "
                            "questions, fewer `shots`, or a separate dev set.")
        self.shots, self.max_length, self.padding_side = shots, max_length, padding_side
        self.prefix_cached = shots > 0 if prefix_cache is None else bool(prefix_cache)
        rows: list[tuple[list[int], list[_Read], str]] = []
        truncated: set[int] = set()  # rows left-truncated to max_length: they never share the prefix
        self.n_multi_token = 0
        self._prompt_ids: list[tuple[list[int], list[list[int]]]] = []
        for qi, q in enumerate(self.questions):
            context = mmlu_prompt(q, examples[q.subject])
            pairs = [encode_pair(tokenizer, context, f" {letter}") for letter in LETTERS]
            ctx = pairs[0][0]
            conts = [c for _, c in pairs]
            self._prompt_ids.append((ctx, conts))
            if any(len(c) == 0 for c in conts):
                raise DataError(f"Question {qi + 1}: an answer letter tokenizes to nothing; this tokenizer "
                                "cannot score MMLU.")
            if all(len(c) == 1 for c in conts):
                inp = ctx[-max_length:]
                if len(ctx) > max_length:
                    truncated.add(len(rows))
                rows.append((inp, [_Read(qi, li, len(inp) - 1, (c[0],)) for li, c in enumerate(conts)], q.subject))
            else:
                self.n_multi_token += 1
                for li, c in enumerate(conts):
                    inp = (ctx + c)[-(max_length + 1):][:-1]
                    if len(ctx) + len(c) > max_length + 1:
                        truncated.add(len(rows))
                    rows.append((inp, [_Read(qi, li, len(inp) - len(c), tuple(c))], q.subject))
        prefixes = self._shared_prefixes([r for i, r in enumerate(rows) if i not in truncated]) \
            if self.prefix_cached else {}
        self.prefix_tokens = sum(len(p) for p in prefixes.values())
        pad = pad_id(tokenizer)
        self.batches: list[EvalBatch] = []
        self.reads: list[list[tuple[int, list[_Read]]]] = []  # per batch: (row in batch, reads) with keep idx
        plain = [r for r in rows if r[2] not in prefixes or rows_prefix_len(r[0], prefixes[r[2]]) == 0]
        groups: list[tuple[list[int], str | None, list]] = [([], None, plain)]
        for subject, prefix in prefixes.items():
            mine = [r for r in rows if r[2] == subject and rows_prefix_len(r[0], prefix) > 0]
            groups.append((prefix, subject, [(ids[len(prefix):], [_Read(x.question, x.letter, x.start - len(prefix),
                                                                         x.targets) for x in reads], subject)
                                             for ids, reads, _ in mine]))
        self.n_prefix_rows = sum(len(g[2]) for g in groups[1:])
        for prefix, key, group in groups:
            order = sorted(range(len(group)), key=lambda r, g=group: -len(g[r][0]))
            for start in range(0, len(order), batch_size):
                chunk = [group[r][:2] for r in order[start:start + batch_size]]
                batch, reads = self._pack(chunk, pad, prefix if key is not None else None, key)
                self.batches.append(batch)
                self.reads.append(reads)

    def _shared_prefixes(self, rows: list[tuple[list[int], list[_Read], str]]) -> dict[str, list[int]]:
        """Per subject: the longest token prefix all its (untruncated) rows share, leaving each row at least
        one token of its own; subjects with one row or a prefix under :attr:`MIN_PREFIX` get none."""
        by_subject: dict[str, list[list[int]]] = {}
        for ids, _reads, subject in rows:
            by_subject.setdefault(subject, []).append(ids)
        out = {}
        for subject, seqs in by_subject.items():
            if len(seqs) < 2:
                continue
            n = min(len(x) for x in seqs) - 1
            first = seqs[0]
            for x in seqs[1:]:
                n = next((i for i in range(n) if x[i] != first[i]), n)
            if n >= self.MIN_PREFIX:
                out[subject] = first[:n]
        return out

    def _pack(self, chunk: list[tuple[list[int], list[_Read]]], pad: int, prefix: list[int] | None = None,
              key: Any = None):
        width = max(len(ids) for ids, _ in chunk)
        n = len(chunk)
        side = "right" if prefix is not None else self.padding_side
        first = len(prefix) if prefix is not None else 0  # position of the rows' first token
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        shifted: list[tuple[int, list[_Read]]] = []
        for row, (ids, reads) in enumerate(chunk):
            offset = width - len(ids) if side == "left" else 0
            input_ids[row, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, offset:offset + len(ids)] = 1
            positions[row, offset:offset + len(ids)] = torch.arange(first, first + len(ids))
            if side == "right" and width > len(ids):
                positions[row, len(ids):] = torch.arange(first + len(ids), first + width)
            shifted.append((row, [_Read(r.question, r.letter, r.start + offset, r.targets) for r in reads]))
        needed = sorted({r.start + j for _, reads in shifted for r in reads for j in range(len(r.targets))})
        keep = torch.tensor(needed, dtype=torch.long)
        index = {p: i for i, p in enumerate(needed)}
        remapped = [(row, [_Read(r.question, r.letter, index[r.start], r.targets) for r in reads])
                    for row, reads in shifted]
        # Keep positions are contiguous for each multi-token read (consecutive positions map to
        # consecutive indices because ``needed`` is sorted and contains the whole run).
        extra = {} if prefix is None else {"prefix": torch.tensor(prefix, dtype=torch.long), "prefix_key": key}
        return EvalBatch(input_ids, mask, positions, keep, **extra), remapped

    def identity(self) -> dict[str, Any]:
        """What is evaluated: the exact token ids of every context and continuation (not the batching)."""
        return {"kind": self.kind, "n": len(self.questions), "shots": self.shots,
                "max_length": self.max_length, "tokens": stable_key(self._prompt_ids),
                "answers": stable_key([q.answer for q in self.questions])}

    def run(self, forward: Forward, progress: ProgressFn | None = None) -> MMLUResult:
        ll = np.zeros((len(self.questions), 4), dtype=np.float64)
        for i, (batch, reads) in enumerate(zip(self.batches, self.reads, strict=True)):
            logits = forward(i, batch)
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, row_reads in reads:
                for r in row_reads:
                    idx = torch.arange(r.start, r.start + len(r.targets), device=logprobs.device)
                    tgt = torch.tensor(r.targets, dtype=torch.long, device=logprobs.device)
                    ll[r.question, r.letter] = float(logprobs[row, idx, tgt].double().sum())
            if progress is not None:
                progress(i + 1, len(self.batches), "mmlu")
        return self._result(ll)

    def _result(self, ll: np.ndarray) -> MMLUResult:
        if not np.isfinite(ll).all():
            raise LayerLensError(NONFINITE)
        answers = np.array([q.answer for q in self.questions])
        pred = ll.argmax(axis=1)  # first maximum on ties, like numpy in the harness
        correct = pred == answers
        shifted = ll - ll.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        subjects = tuple(q.subject for q in self.questions)
        per_subject: dict[str, float] = {}
        per_subject_n: dict[str, int] = {}
        for s in dict.fromkeys(subjects):
            sel = np.array([x == s for x in subjects])
            per_subject[s] = float(correct[sel].mean())
            per_subject_n[s] = int(sel.sum())
        return MMLUResult(
            accuracy=float(correct.mean()), per_subject=per_subject, n=len(self.questions),
            mean_prob_correct=float(probs[np.arange(len(answers)), answers].mean()),
            choices=tuple(int(x) for x in pred), correct=tuple(bool(x) for x in correct),
            loglikelihoods=tuple(tuple(float(v) for v in row) for row in ll),  # type: ignore[misc]
            subjects=subjects, shots=self.shots, n_multi_token=self.n_multi_token, per_subject_n=per_subject_n,
            fewshot_excluded=len(self.excluded))


def mmlu(model: torch.nn.Module, tokenizer: Any, questions: QuestionSet | Iterable[Question | Mapping[str, Any]],
         shots: int = 0, dev: QuestionSet | Iterable[Question | Mapping[str, Any]] | None = None,
         batch_size: int = DEFAULT_MMLU_BATCH, progress: ProgressFn | None = None,
         padding_side: str = "right", prefix_cache: bool | None = None) -> MMLUResult:
    """Score MMLU questions exactly like lm-evaluation-harness's ``mmlu`` task (see the module doc).

    ``prefix_cache``: run each subject's shared prompt prefix once into a KV cache (default: with shots).
    """
    task = MMLUTask(tokenizer, questions, shots=shots, dev=dev, batch_size=batch_size, padding_side=padding_side,
                    max_length=harness_max_length(model, tokenizer), prefix_cache=prefix_cache)
    return task.run(plain_forward(model), progress)
