"""Heal a pruned model: LoRA (through ``peft``) trained with next-token loss, distillation from the
unpruned original, or both, under a step or time budget.

Why each step is as it is:

* The student is a pruned model from :func:`layerlens.surgery.apply_plan`: new module objects that SHARE
  parameter tensors with the original. The weights LoRA is merged into get private copies first (merging
  adds in place), and every ``requires_grad`` flag of the shared tensors is restored afterwards, so the
  original (the teacher, often a cached model other users hold) stays bit-identical and unwrapped.
* Training windows come from the training texts (the calibration plays by default), held-out perplexity
  from disjoint evaluation texts, both cut like the perplexity protocol (non-overlapping windows).
* The held-out perplexity is measured at checkpoints; the LoRA state with the best one is what is kept, so
  a stop (``stop()`` returning True, Ctrl-C, the time budget) keeps the best state so far.
* The result is merged into the weights, so the healed model needs no ``peft`` to load or run.

Why one module over ~400 lines: the training loop, its checkpoints and the persisted read-back must
agree on one LoRA layout (targets, private weight copies, restored flags); they are kept together.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .adapters import decoder_layers
from .errors import DataError, LayerLensError
from .evaluation import perplexity, perplexity_windows
from .runs import atomic_write_json, model_fingerprint, provenance, stable_key
from .surgery import apply_plan

LOSSES = ("lm", "kd", "both")
TARGETS = ("all", "cut")
SCHEDULES = ("cosine", "constant")

Progress = Callable[[int, int, str], None]
Watch = Callable[[list[list[float]], list[list[float]]], None]  # (curve, evals) so far; read, never change


@dataclass(frozen=True)
class HealConfig:
    """How to heal. ``loss``: ``lm`` (next-token cross-entropy), ``kd`` (KL to the original's token
    distribution at ``temperature``), ``both`` (``kd_weight`` * KD + (1 - ``kd_weight``) * LM). Budget:
    ``steps`` and/or ``seconds`` (whichever ends first). ``targets``: LoRA on the attention and MLP
    projections of ``all`` layers, or only of the layers next to each ``cut`` (and merged layers)."""

    loss: str = "kd"
    steps: int | None = None
    seconds: float | None = 60.0
    lr: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 5
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: str = "all"
    temperature: float = 2.0
    kd_weight: float = 0.5
    batch_size: int = 4
    seq_len: int = 128
    eval_windows: int = 8
    eval_every: int = 20
    seed: int = 0

    def validate(self, hidden_size: int | None = None) -> None:
        """One sentence naming the parameter for each thing a user can get wrong."""
        if self.loss not in LOSSES:
            raise LayerLensError(f"`loss` must be one of {', '.join(LOSSES)} (got {self.loss!r}).")
        if self.targets not in TARGETS:
            raise LayerLensError(f"`targets` must be one of {', '.join(TARGETS)} (got {self.targets!r}).")
        if self.schedule not in SCHEDULES:
            raise LayerLensError(f"`schedule` must be one of {', '.join(SCHEDULES)} (got {self.schedule!r}).")
        if self.steps is None and self.seconds is None:
            raise LayerLensError("Give a budget: `steps` or `seconds` (or both).")
        if self.steps is not None and self.steps < 1:
            raise LayerLensError(f"`steps` must be at least 1 (got {self.steps}).")
        if self.seconds is not None and not self.seconds > 0:
            raise LayerLensError(f"`seconds` must be positive (got {self.seconds}).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise LayerLensError(f"`lr` must be a positive learning rate (got {self.lr}).")
        if self.lora_rank < 1 or (hidden_size is not None and self.lora_rank > hidden_size):
            limit = f" and at most the hidden size {hidden_size}" if hidden_size is not None else ""
            raise LayerLensError(f"`lora_rank` must be at least 1{limit} (got {self.lora_rank}).")
        if self.batch_size < 1 or self.seq_len < 2 or self.eval_windows < 1 or self.eval_every < 1:
            raise LayerLensError("`batch_size`, `eval_windows` and `eval_every` must be at least 1 and "
                                 "`seq_len` at least 2.")
        if not 0.0 <= self.kd_weight <= 1.0 or not self.temperature > 0:
            raise LayerLensError("`kd_weight` must be in [0, 1] and `temperature` positive.")


@dataclass
class HealResult:
    """What healing did. ``curve``: ``[step, training loss]``; ``evals``: ``[step, held-out perplexity,
    seconds since the start]`` at each checkpoint (step 0 = the pruned model); ``best_step``: the checkpoint
    kept."""

    model: nn.Module
    ppl_before: float
    ppl_after: float
    steps: int
    tokens: int
    seconds: float
    curve: list[list[float]] = field(default_factory=list)
    evals: list[list[float]] = field(default_factory=list)
    best_step: int = 0
    stopped: str = "budget"
    targets: list[str] = field(default_factory=list)
    adapter: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    config: HealConfig = field(default_factory=HealConfig)
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON ``heal`` object (exports, runs folder): everything but the model and adapter tensors."""
        return {"loss": self.config.loss, "steps": self.steps, "seconds": round(self.seconds, 3),
                "tokens": self.tokens, "ppl_before": self.ppl_before, "ppl_after": self.ppl_after,
                "best_step": self.best_step, "stopped": self.stopped, "curve": self.curve, "evals": self.evals,
                "targets": self.targets, "config": asdict(self.config), "meta": self.meta}


def cut_neighbours(plan: Any) -> tuple[int, ...]:
    """Indices (in the pruned model) of the layers next to each cut: the kept layer below and above every
    removed run, and every merged layer."""
    lmap = plan.layer_map
    kept = plan.kept_layers
    out: set[int] = {lmap[g[0]] for g in plan.merge}
    for i in plan.removed_layers:
        below = [k for k in kept if k < i]
        above = [k for k in kept if k > i]
        if below:
            out.add(lmap[below[-1]])
        if above:
            out.add(lmap[above[0]])
    return tuple(sorted(out))


def _is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # gpt2's projections are Conv1D


def lora_targets(model: nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """Full names of the attention and MLP projections inside the chosen decoder layers (all when None)."""
    chosen = decoder_layers(model)
    wanted = {id(m) for j, layer in enumerate(chosen) if layers is None or j in layers
              for m in layer.modules() if _is_projection(m)}
    return [name for name, m in model.named_modules() if id(m) in wanted]


def _check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    s, t = student.get_output_embeddings(), teacher.get_output_embeddings()
    if s is None or t is None or s.weight.shape[0] != t.weight.shape[0]:
        raise LayerLensError("The teacher's vocabulary differs from the pruned model's; distill only from "
                             "the original model the plan was applied to (same tokenizer).")


def _kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at ``temperature``, times T^2 (Hinton et al.), mean over tokens."""
    t = temperature
    s = F.log_softmax(student_logits / t, dim=-1)
    p = F.log_softmax(teacher_logits / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="none").sum(-1).mean() * t * t


def _lr_at(config: HealConfig, step: int, fraction: float) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.schedule == "constant":
        return config.lr * warm
    return config.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@contextlib.contextmanager
def lora_wrapped(student: nn.Module, names: Sequence[str], config: HealConfig) -> Iterator[nn.Module]:
    """``student`` with LoRA on ``names`` (peft wraps those modules in place, in the student only).

    The targets' weights become private copies first (merging adds into them, and the pruned student
    shares its tensors with the original); every ``requires_grad`` flag is restored on exit, because peft
    freezes all non-LoRA parameters and those are shared with the original too.
    """
    import peft  # heavy: only when healing

    modules = dict(student.named_modules())
    with torch.no_grad():
        for name in names:
            m = modules[name]
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
    shared = list(student.parameters())
    flags = [p.requires_grad for p in shared]
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(names), bias="none")
    try:
        yield peft.get_peft_model(student, lora)
    finally:
        for p, flag in zip(shared, flags, strict=True):
            p.requires_grad_(flag)


def heal(student: nn.Module, tokenizer: Any, train_texts: Any, eval_texts: Any,
         config: HealConfig = HealConfig(), *, teacher: nn.Module | None = None, plan: Any = None,
         progress: Progress | None = None, stop: Callable[[], bool] | None = None,
         watch: Watch | None = None) -> HealResult:
    """Train LoRA on ``student`` (a pruned model) and return it merged, with the measurements.

    ``teacher`` (the unpruned original) is needed for ``kd``/``both``; ``plan`` for ``targets="cut"``.
    ``progress(step, total, label)`` reports step, loss, tokens/s and time left; ``stop()`` returning True
    ends training at the next step (the best checkpoint is kept, like at the end of the budget);
    ``watch(curve, evals)``, after every step, gets the live lists (a dashboard draws them as they grow).
    """
    hidden = getattr(student.config, "hidden_size", None) or getattr(student.config, "n_embd", None)
    config.validate(hidden)
    if config.loss != "lm":
        if teacher is None:
            raise LayerLensError(f"`loss={config.loss}` distills from the original model; pass it as the teacher.")
        _check_teacher(student, teacher)
    if config.targets == "cut" and plan is None:
        raise LayerLensError("`targets=cut` needs the plan (which layers were cut).")
    try:
        train = perplexity_windows(tokenizer, train_texts, seq_len=config.seq_len)
    except DataError as exc:
        raise LayerLensError(f"Not enough training text for one window of `seq_len={config.seq_len}` tokens; "
                             "give more texts or a smaller `seq_len`.") from exc
    held_out = perplexity_windows(tokenizer, eval_texts, seq_len=config.seq_len, max_windows=config.eval_windows)
    if {tuple(w) for w in held_out.tolist()} & {tuple(w) for w in train.tolist()}:
        raise LayerLensError("The held-out texts overlap the training texts, so perplexity after healing would "
                             "be measured on trained text; give disjoint evaluation texts.")
    device = next(student.parameters()).device
    evaluate = lambda m: float(perplexity(m, tokenizer, eval_texts, seq_len=config.seq_len,  # noqa: E731
                                          max_windows=config.eval_windows).perplexity)
    student.eval()
    ppl_before = evaluate(student)

    names = lora_targets(student, cut_neighbours(plan) if config.targets == "cut" else None)
    if not names:
        raise LayerLensError("The plan leaves no layer next to a cut to heal; use `targets=all`.")
    torch.manual_seed(config.seed)  # LoRA's initial A matrices
    with lora_wrapped(student, names, config) as wrapped:
        result = _train(wrapped, train, evaluate, config, teacher, device, progress, stop, ppl_before, watch)
        merged = wrapped.merge_and_unload().eval()
    result.model = merged
    result.targets = names
    result.ppl_after = evaluate(merged)
    result.meta = provenance(seq_len=config.seq_len, seed=config.seed, train_windows=len(train),
                             train_data=getattr(train_texts, "source", None),
                             eval_data=getattr(eval_texts, "source", None), device=device.type,
                             peft_version=importlib.metadata.version("peft"))
    return result


def _train(model: nn.Module, train: torch.Tensor, evaluate: Callable[[nn.Module], float], config: HealConfig,
           teacher: nn.Module | None, device: torch.device, progress: Progress | None,
           stop: Callable[[], bool] | None, ppl_before: float, watch: Watch | None = None) -> HealResult:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    best = (ppl_before, 0, _lora_state(model))
    curve: list[list[float]] = []
    evals: list[list[float]] = [[0, ppl_before, 0.0]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and \
        torch.cuda.is_bf16_supported() else torch.autocast("cpu", enabled=False)
    total = config.steps or 0
    t0 = time.perf_counter()
    step = tokens = 0
    stopped = "budget"

    def checkpoint() -> None:
        nonlocal best
        model.eval()
        ppl = evaluate(model)
        model.train()
        evals.append([step, ppl, round(time.perf_counter() - t0, 3)])
        if ppl < best[0]:
            best = (ppl, step, _lora_state(model))

    model.train()
    if watch is not None:
        watch(curve, evals)
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if config.steps is not None and step >= config.steps:
                break
            if config.seconds is not None and elapsed >= config.seconds:
                break
            if stop is not None and stop():
                stopped = "stopped"
                break
            if not order:
                order = torch.randperm(len(train), generator=gen).tolist()
            idx = [order.pop() for _ in range(min(config.batch_size, len(order)))]
            batch = train[idx].to(device)
            fraction = max(step / config.steps if config.steps else 0.0,
                           elapsed / config.seconds if config.seconds else 0.0)
            for g in opt.param_groups:
                g["lr"] = _lr_at(config, step, fraction)
            with autocast:
                logits = model(input_ids=batch).logits.float()
            loss = torch.zeros((), device=device)
            if config.loss in ("lm", "both"):
                lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                loss = loss + (1.0 - (config.kd_weight if config.loss == "both" else 0.0)) * lm
            if config.loss in ("kd", "both"):
                with torch.no_grad(), autocast:
                    t_logits = teacher(input_ids=batch).logits.float()  # type: ignore[misc]
                kd = _kd_loss(logits, t_logits, config.temperature)
                loss = loss + (config.kd_weight if config.loss == "both" else 1.0) * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            tokens += batch.numel()
            curve.append([step, float(loss.detach())])
            if step % config.eval_every == 0:
                checkpoint()
            if watch is not None:
                watch(curve, evals)
            if progress is not None:
                spent = time.perf_counter() - t0
                left = []
                if config.seconds is not None:
                    left.append(config.seconds - spent)
                if config.steps is not None:
                    left.append((config.steps - step) * spent / step)
                goal = config.steps or step + max(1, int(step * max(min(left), 0.0) / max(spent, 1e-9)))
                progress(step, max(goal, total), f"heal: step {step} · loss {curve[-1][1]:.4f} · "
                         f"{tokens / max(spent, 1e-9):.0f} tok/s · {max(min(left), 0.0):.0f} s left")
    except KeyboardInterrupt:
        stopped = "interrupted"
    if not evals or evals[-1][0] != step:
        checkpoint()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in best[2]:
                p.copy_(best[2][name])
    return HealResult(model=model, ppl_before=ppl_before, ppl_after=best[0], steps=step, tokens=tokens,
                      seconds=time.perf_counter() - t0, curve=curve, evals=evals, best_step=best[1],
                      stopped=stopped, adapter=best[2], config=config)


# -- persisted results: the same request is read back, not retrained -------------------------------------------
HEAL_FORMAT = 1


def heal_key(original: nn.Module, plan: Any, tokenizer: Any, train_texts: Any, eval_texts: Any,
             config: HealConfig) -> str:
    """The identity of a healing request: model, plan, the exact training and evaluation windows, config."""
    def windows(texts: Any) -> str:
        ids = perplexity_windows(tokenizer, texts, seq_len=config.seq_len)
        return stable_key(ids.reshape(-1)[:: max(1, ids.numel() // 65536)].tolist() + [ids.numel()])

    return stable_key({"format": HEAL_FORMAT, "model": model_fingerprint(original), "plan": plan.to_dict(),
                       "train": windows(train_texts), "eval": windows(eval_texts), "config": asdict(config)})


def _paths(runs_dir: str | Path, key: str) -> tuple[Path, Path]:
    folder = Path(runs_dir) / "heal"
    return folder / f"{key}.json", folder / f"{key}.safetensors"


def _rebuild(original: nn.Module, plan: Any, record: dict[str, Any], adapter: dict[str, torch.Tensor],
             config: HealConfig) -> nn.Module:
    """The healed model from a saved adapter: the same LoRA on the same targets, loaded, merged."""
    with lora_wrapped(apply_plan(original, plan), record["targets"], config) as wrapped:
        with torch.no_grad():
            params = dict(wrapped.named_parameters())
            for name, value in adapter.items():
                params[name].copy_(value)
        merged = wrapped.merge_and_unload()
    return merged.eval()


def heal_plan(original: nn.Module, tokenizer: Any, plan: Any, train_texts: Any, eval_texts: Any,
              config: HealConfig = HealConfig(), *, runs_dir: str | Path | None = None,
              progress: Progress | None = None, stop: Callable[[], bool] | None = None,
              watch: Watch | None = None) -> HealResult:
    """Apply ``plan`` to ``original`` (untouched) and heal it, distilling from ``original`` when the loss
    asks for it; with ``runs_dir`` a finished result is persisted and the same request read back."""
    key = heal_key(original, plan, tokenizer, train_texts, eval_texts, config)
    record_path, adapter_path = _paths(runs_dir, key) if runs_dir is not None else (None, None)
    if record_path is not None and record_path.exists() and adapter_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        adapter = load_file(str(adapter_path))
        model = _rebuild(original, plan, record, adapter, config)
        return HealResult(model=model, ppl_before=record["ppl_before"], ppl_after=record["ppl_after"],
                          steps=record["steps"], tokens=record["tokens"], seconds=record["seconds"],
                          curve=record["curve"], evals=record["evals"], best_step=record["best_step"],
                          stopped=record["stopped"], targets=record["targets"], adapter=adapter, config=config,
                          meta=record["meta"] | {"cached": True, "key": key})
    result = heal(apply_plan(original, plan), tokenizer, train_texts, eval_texts, config, teacher=original,
                  plan=plan, progress=progress, stop=stop, watch=watch)
    result.meta["key"] = key
    if record_path is not None and result.stopped == "budget":  # a stopped run is not the request's result
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = adapter_path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in result.adapter.items()}, str(tmp))
        tmp.replace(adapter_path)
        atomic_write_json(record_path, result.record())
    return result
