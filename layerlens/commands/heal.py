"""`layerlens heal`: prune, then heal the pruned model with LoRA (next-token loss, distillation from the
original, or both) and save it merged, so plain ``transformers`` loads it.

    layerlens heal --model M (--plan FILE | --strategy S --ratio R | --remove LIST) [--data D]
                   [--loss lm|kd|both] [--seconds S | --steps N] [--lora-rank r] [--lr X] --out DIR

``M`` is the original model and, for ``kd``/``both``, the teacher. Training windows come from ``--data``
(default: the bundled calibration plays), held-out perplexity from ``--eval-data`` (default: the bundled
evaluation plays, disjoint). ``layerlens_plan.json`` gains a ``heal`` object. ``--adapter-only`` writes the
peft adapter (and the plan it applies to) instead of the merged model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..cli import add_data_args, add_model_args, add_runs_arg, cli_progress
from ..data import load_texts
from ..errors import LayerLensError
from ..export import PLAN_FILE, plan_record, save_pruned
from ..heal import HealConfig, heal_plan
from ..runs import atomic_dir, atomic_write_json, default_runs_dir, provenance
from .prune import add_plan_args, add_save_dtype_arg, format_plan, load_and_plan, save_dtype


def _config(args: argparse.Namespace) -> HealConfig:
    seconds = args.seconds if args.steps is None or args.seconds_given else None
    return HealConfig(loss=args.loss, steps=args.steps, seconds=seconds, lr=args.lr, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
                      targets=args.targets, temperature=args.temperature, kd_weight=args.kd_weight,
                      batch_size=args.heal_batch_size, seq_len=args.seq_len, eval_windows=args.eval_windows,
                      eval_every=args.eval_every, seed=args.seed)


def _save_adapter(result: Any, plan: Any, tokenizer: Any, out: Path, record: dict[str, Any]) -> None:
    """The LoRA adapter in peft's on-disk format (applies to the pruned model the plan describes)."""
    config = result.config
    tensors = {k.replace(".default.", "."): v.contiguous() for k, v in result.adapter.items()}
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
                      "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "bias": "none",
                      "target_modules": [t.removeprefix("base_model.model.") for t in result.targets],
                      "base_model_name_or_path": record["meta"].get("model"), "inference_mode": True}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1), encoding="utf-8")
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PLAN_FILE, record)


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    out, loaded, plan, report, data = load_and_plan(args, "healed model", config.validate)
    if not plan.changes_model:  # a plan may only drop attention/MLP sublayers: that is pruning too
        raise LayerLensError("The plan removes no layer and drops no sublayer, so there is nothing to heal; give a "
                             "plan that prunes.")
    train = load_texts(args.data, role="calibration", field=args.text_field)
    held_out = load_texts(args.eval_data, role="eval", field=args.text_field)
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    result = heal_plan(loaded.model, loaded.tokenizer, plan, train, held_out, config, runs_dir=runs,
                       progress=cli_progress("heal"))
    meta = provenance(model=loaded.info.model, revision=loaded.info.revision, model_type=loaded.info.model_type,
                      dtype=loaded.info.dtype, device=loaded.info.device, num_layers=loaded.info.num_layers,
                      num_layers_after=plan.num_layers_after, **(data if data is not None else {"data": None}))
    heal_record = result.record()
    if args.adapter_only:
        _save_adapter(result, plan, loaded.tokenizer, out, plan_record(plan, report=report, meta=meta,
                                                                      heal=heal_record))
    else:
        save_pruned(result.model, loaded.tokenizer, plan, out, report=report, meta=meta, heal=heal_record,
                    dtype=save_dtype(args, loaded))
    print(format_plan(plan))
    cached = " (read back from the runs folder)" if result.meta.get("cached") else ""
    print(f"healed{cached}: {result.steps} steps, {result.tokens} tokens, {result.seconds:.1f} s, "
          f"loss {config.loss}; held-out perplexity {result.ppl_before:.4g} -> {result.ppl_after:.4g} "
          f"(best step {result.best_step}, {result.stopped})")
    print(f"wrote {out} ({'adapter' if args.adapter_only else f'{plan.num_layers_after} layers, LoRA merged'})")
    return 0


class _SecondsAction(argparse.Action):
    """Remember that --seconds was given, so --steps alone means "no time limit"."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.seconds_given = True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heal", help="prune, heal the pruned model with LoRA (LM loss / distillation), save it")
    add_model_args(p)
    add_data_args(p, seq_len=128)  # --data: the training texts (and the report's calibration data)
    add_runs_arg(p)
    add_plan_args(p)
    g = p.add_argument_group("healing (LoRA through peft)")
    g.add_argument("--loss", choices=["lm", "kd", "both"], default="kd",
                   help="lm: next-token loss; kd: distillation from the original (the teacher); both: weighted")
    g.add_argument("--seconds", type=float, default=60.0, action=_SecondsAction,
                   help="time budget (default 60; with --steps alone there is no time limit)")
    g.add_argument("--steps", type=int, default=None, help="number of optimizer steps")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    g.add_argument("--targets", choices=["all", "cut"], default="all",
                   help="LoRA on every layer's attention and MLP projections, or only next to each cut")
    g.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    g.add_argument("--kd-weight", type=float, default=0.5, help="with --loss both: weight of distillation")
    g.add_argument("--heal-batch-size", type=int, default=4, help="windows of --seq-len tokens per step")
    g.add_argument("--eval-data", default="default", help="held-out texts for perplexity before/after")
    g.add_argument("--eval-windows", type=int, default=8, help="held-out windows at each checkpoint")
    g.add_argument("--eval-every", type=int, default=20, help="steps between held-out checkpoints")
    g.add_argument("--adapter-only", action="store_true", help="write the peft adapter, not the merged model")
    p.add_argument("--out", required=True, help="output folder for the healed model")
    add_save_dtype_arg(p)
    p.set_defaults(func=run, replace="none", seconds_given=False)
