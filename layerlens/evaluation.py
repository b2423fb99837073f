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
  ``first_n`` sampler);
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

Why one module over ~400 lines: perplexity and MMLU share the task/forward split that sweeps reuse
with cached hidden states; one module keeps that contract in one place.
"""

from __future__ import annotations

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
    """One model input. ``keep``: the positions whose logits are needed (None: all)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    keep: torch.Tensor | None = None

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


def model_logits(model: torch.nn.Module, batch: EvalBatch) -> torch.Tensor:
    """The model's logits for ``batch`` (only at ``batch.keep`` when given), as float32."""
    device = model_device(model)
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids.to(device), "use_cache": False}
    if batch.attention_mask is not None:
        kwargs["attention_mask"] = batch.attention_mask.to(device)
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
    return lambda _index, batch: model_logits(model, batch)


def _tokenizer_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer.encode(text)`` with the tokenizer's defaults (special tokens as it adds them)."""
    return list(tokenizer(text, verbose=False)["input_ids"])


# --------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    max_windows: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "nll": self.nll, "n_tokens": self.n_tokens,
                "n_windows": self.n_windows, "seq_len": self.seq_len, "max_windows": self.max_windows}


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
                 batch_size: int = DEFAULT_PPL_BATCH, max_windows: int | None = None):
        if batch_size < 1:
            raise LayerLensError(f"`batch_size` must be at least 1 (got {batch_size}).")
        self.windows = perplexity_windows(tokenizer, texts, seq_len, max_windows)
        self.seq_len, self.max_windows = seq_len, max_windows
        self.batches = [EvalBatch(w) for w in self.windows.split(batch_size)]

    def identity(self) -> dict[str, Any]:
        """What is evaluated (not how it is batched): the exact token windows."""
        digest = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()[:16]
        return {"kind": self.kind, "seq_len": self.seq_len, "n_windows": len(self.windows), "tokens": digest}

    def run(self, forward: Forward, progress: ProgressFn | None = None) -> PerplexityResult:
        total_nll, n_tokens = 0.0, 0
        for i, batch in enumerate(self.batches):
            logits = forward(i, batch)
            # position t predicts token t+1; the last position predicts nothing (ignored, no logits copy)
            targets = torch.full_like(batch.input_ids, -100)
            targets[:, :-1] = batch.input_ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                                  ignore_index=-100, reduction="none")
            total_nll += float(nll.double().sum())
            n_tokens += int((targets != -100).sum())
            if progress is not None:
                progress(i + 1, len(self.batches), "perplexity")
        mean = total_nll / n_tokens
        if not math.isfinite(mean):
            raise LayerLensError(NONFINITE)
        return PerplexityResult(perplexity=math.exp(mean), nll=mean, n_tokens=n_tokens,
                                n_windows=len(self.windows), seq_len=self.seq_len, max_windows=self.max_windows)


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Any, seq_len: int = DEFAULT_SEQ_LEN,
               batch_size: int = DEFAULT_PPL_BATCH, max_windows: int | None = None,
               progress: ProgressFn | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (str, list of str, or a TextSet), standard window protocol."""
    check_window(model, seq_len)
    task = PerplexityTask(tokenizer, texts, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows)
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

    def to_dict(self, per_question: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"accuracy": self.accuracy, "per_subject": dict(self.per_subject), "n": self.n,
                             "mean_prob_correct": self.mean_prob_correct, "shots": self.shots,
                             "per_subject_n": dict(self.per_subject_n), "n_multi_token": self.n_multi_token}
        if per_question:
            d["choices"] = list(self.choices)
            d["correct"] = list(self.correct)
            d["loglikelihoods"] = [list(x) for x in self.loglikelihoods]
        return d


class MMLUTask:
    """Tokenized MMLU requests, batched by length; :meth:`run` scores them with any forward.

    ``padding_side`` ("right" or "left") only changes how rows are packed; attention masks and position
    ids make both give the same log-likelihoods (to float rounding).
    """

    kind = "mmlu"

    def __init__(self, tokenizer: Any, questions: QuestionSet | Iterable[Question | Mapping[str, Any]], *,
                 shots: int = 0, dev: QuestionSet | Iterable[Question | Mapping[str, Any]] | None = None,
                 batch_size: int = DEFAULT_MMLU_BATCH, padding_side: str = "right",
                 max_length: int = HARNESS_DEFAULT_MAX_LENGTH):
        if batch_size < 1:
            raise LayerLensError(f"`batch_size` must be at least 1 (got {batch_size}).")
        if padding_side not in ("left", "right"):
            raise LayerLensError(f"padding_side must be 'left' or 'right' (got {padding_side!r}).")
        if shots < 0:
            raise LayerLensError(f"`shots` must be 0 or more (got {shots}).")
        self.questions = as_questions(questions)
        if not self.questions:
            raise DataError("No MMLU questions to evaluate; check the data and the subject filter.")
        if shots > 0 and dev is None:
            raise DataError(f"`shots={shots}` needs a dev set of examples (e.g. the hub dataset's dev split "
                            "or `dev=FILE`).")
        dev_q = as_questions(dev) if dev is not None else ()
        self.shots, self.max_length, self.padding_side = shots, max_length, padding_side
        rows: list[tuple[list[int], list[_Read]]] = []
        self.n_multi_token = 0
        self._prompt_ids: list[tuple[list[int], list[list[int]]]] = []
        for qi, q in enumerate(self.questions):
            context = mmlu_prompt(q, select_shots(q, dev_q, shots))
            pairs = [encode_pair(tokenizer, context, f" {letter}") for letter in LETTERS]
            ctx = pairs[0][0]
            conts = [c for _, c in pairs]
            self._prompt_ids.append((ctx, conts))
            if any(len(c) == 0 for c in conts):
                raise DataError(f"Question {qi + 1}: an answer letter tokenizes to nothing; this tokenizer "
                                "cannot score MMLU.")
            if all(len(c) == 1 for c in conts):
                inp = ctx[-max_length:]
                rows.append((inp, [_Read(qi, li, len(inp) - 1, (c[0],)) for li, c in enumerate(conts)]))
            else:
                self.n_multi_token += 1
                for li, c in enumerate(conts):
                    inp = (ctx + c)[-(max_length + 1):][:-1]
                    rows.append((inp, [_Read(qi, li, len(inp) - len(c), tuple(c))]))
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
        pad = pad_id(tokenizer)
        self.batches: list[EvalBatch] = []
        self.reads: list[list[tuple[int, list[_Read]]]] = []  # per batch: (row in batch, reads) with keep idx
        for start in range(0, len(order), batch_size):
            chunk = [rows[r] for r in order[start:start + batch_size]]
            batch, reads = self._pack(chunk, pad)
            self.batches.append(batch)
            self.reads.append(reads)

    def _pack(self, chunk: list[tuple[list[int], list[_Read]]], pad: int):
        width = max(len(ids) for ids, _ in chunk)
        n = len(chunk)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        shifted: list[tuple[int, list[_Read]]] = []
        for row, (ids, reads) in enumerate(chunk):
            offset = width - len(ids) if self.padding_side == "left" else 0
            input_ids[row, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, offset:offset + len(ids)] = 1
            positions[row, offset:offset + len(ids)] = torch.arange(len(ids))
            if self.padding_side == "right" and width > len(ids):
                positions[row, len(ids):] = torch.arange(len(ids), width)
            shifted.append((row, [_Read(r.question, r.letter, r.start + offset, r.targets) for r in reads]))
        needed = sorted({r.start + j for _, reads in shifted for r in reads for j in range(len(r.targets))})
        keep = torch.tensor(needed, dtype=torch.long)
        index = {p: i for i, p in enumerate(needed)}
        remapped = [(row, [_Read(r.question, r.letter, index[r.start], r.targets) for r in reads])
                    for row, reads in shifted]
        # Keep positions are contiguous for each multi-token read (consecutive positions map to
        # consecutive indices because ``needed`` is sorted and contains the whole run).
        return EvalBatch(input_ids, mask, positions, keep), remapped

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
            subjects=subjects, shots=self.shots, n_multi_token=self.n_multi_token, per_subject_n=per_subject_n)


def mmlu(model: torch.nn.Module, tokenizer: Any, questions: QuestionSet | Iterable[Question | Mapping[str, Any]],
         shots: int = 0, dev: QuestionSet | Iterable[Question | Mapping[str, Any]] | None = None,
         batch_size: int = DEFAULT_MMLU_BATCH, progress: ProgressFn | None = None,
         padding_side: str = "right") -> MMLUResult:
    """Score MMLU questions exactly like lm-evaluation-harness's ``mmlu`` task (see the module doc)."""
    task = MMLUTask(tokenizer, questions, shots=shots, dev=dev, batch_size=batch_size,
                    padding_side=padding_side, max_length=harness_max_length(model, tokenizer))
    return task.run(plain_forward(model), progress)
