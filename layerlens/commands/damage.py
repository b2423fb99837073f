"""`layerlens damage`: leave-one-out damage of every layer (and sublayer) to DIR/damage.json, with how well
each redundancy metric predicts it."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from ..cli import add_data_args, add_model_args, add_runs_arg, analyze_from_args, cli_progress, load_from_args
from ..damage import (
    DEFAULT_DAMAGE_WINDOWS,
    METRIC_LABELS,
    damage_document,
    leave_one_out,
    sublayer_plans_available,
)
from ..data import load_texts
from ..errors import LayerLensError
from ..evaluation import DEFAULT_PPL_BATCH
from ..report import LayerReport
from ..runs import atomic_write_json, default_runs_dir, provenance


def _num(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_damage(doc: dict[str, Any]) -> str:
    """The leave-one-out table(s), the correlations and the best predictor, as text."""
    lines = [f"baseline perplexity {doc['baseline_ppl']:.4f}"]
    for key, title in (("layers", "layer"), ("attn", "attention"), ("mlp", "MLP")):
        rows = doc.get(key)
        if not rows:
            continue
        order = sorted(range(len(rows)), key=lambda r: (rows[r]["ppl"], r))
        rank = {r: i + 1 for i, r in enumerate(order)}
        lines.append(f"{title:>9}  {'perplexity':>11}  {'increase':>10}  {'KL':>9}  {'top-1':>6}  {'rank':>4}")
        for r, row in enumerate(rows):
            lines.append(f"{row['index']:>9}  {row['ppl']:>11.4f}  {row['ppl_increase']:>+10.4f}  "
                         f"{_num(row['kl'], '.5f'):>9}  {_num(row.get('top1_agreement'), '.3f'):>6}  {rank[r]:>4}")
    if doc["correlations"]:
        lines.append(f"{'metric':<38}  {'units':>8}  {'Spearman':>8}  {'Kendall':>8}  (vs perplexity increase)")
        for name, c in doc["correlations"].items():
            lines.append(f"{METRIC_LABELS.get(name, name):<38}  {c['units']:>8}  {_num(c['spearman'], '+.3f'):>8}  "
                         f"{_num(c['kendall'], '+.3f'):>8}")
    best = doc.get("best_predictor")
    if best:
        lines.append(f"best predictor of the layer damage: {best['label']} (sign-adjusted Spearman "
                     f"{best['signed_spearman']:+.3f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.sublayers and not sublayer_plans_available():
        raise LayerLensError("This version cannot drop attention/MLP sublayers; leave out --sublayers.")
    texts = load_texts(args.ppl_data, role="eval", field=args.text_field)
    loaded = load_from_args(args)
    info = loaded.info
    t0 = time.perf_counter()
    if args.report:
        report = LayerReport.read(args.report, num_layers=info.num_layers, model_type=info.model_type)
    else:
        report = analyze_from_args(args, loaded)
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    max_windows = args.max_windows if args.max_windows and args.max_windows > 0 else None
    result = leave_one_out(loaded.model, loaded.tokenizer, texts, sublayers=args.sublayers, seq_len=args.seq_len,
                           max_windows=max_windows, batch_size=args.ppl_batch_size, kl=not args.no_kl,
                           runs_dir=runs, model_id=info.to_dict(), progress=cli_progress("damage"))
    s = result.stats
    meta = provenance(
        model=info.model, revision=info.revision, dtype=info.dtype, device=info.device, data=texts.source,
        calibration=report.data_provenance() | {"report": args.report}, samples=result.task.get("n_windows"),
        seq_len=args.seq_len, max_windows=max_windows, seed=args.seed, sublayers=bool(args.sublayers),
        kl=not args.no_kl, model_info=info.to_dict(), seconds=round(time.perf_counter() - t0, 3),
        units_computed=s.computed, units_cached=s.cached, layer_passes=s.layer_passes,
        layer_passes_from_scratch=s.layer_passes_from_scratch)
    doc = damage_document(result, report, meta)
    path = atomic_write_json(Path(args.out) / "damage.json", doc)
    print(format_damage(doc))
    print(f"{s.computed} removals computed, {s.cached} read back; {s.layer_passes} layer passes "
          f"({s.layer_passes_from_scratch} from scratch)")
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("damage", help="leave-one-out damage: perplexity and KL with each layer (or sublayer) "
                                      "alone removed, and how well each metric predicts it")
    add_model_args(p)
    add_data_args(p)  # calibration data for the metrics (--seq-len is also the perplexity window)
    p.add_argument("--report", default=None, help="use this report.json for the metrics instead of analyzing")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl-data", default="default",
                   help="held-out texts: 'default' (bundled evaluation plays, disjoint from the calibration "
                        "plays), 'prose', a .txt/.jsonl/.json/.csv/.parquet file, or a hub dataset")
    g.add_argument("--max-windows", type=int, default=DEFAULT_DAMAGE_WINDOWS,
                   help=f"perplexity windows of --seq-len tokens (0 = all; default {DEFAULT_DAMAGE_WINDOWS})")
    g.add_argument("--ppl-batch-size", type=int, default=DEFAULT_PPL_BATCH, help="windows per forward pass")
    g.add_argument("--sublayers", action="store_true", help="also remove each attention and MLP sublayer alone")
    g.add_argument("--no-kl", action="store_true", help="skip KL(original || pruned) and top-1 agreement")
    add_runs_arg(p)
    p.add_argument("--out", required=True, help="output folder for damage.json")
    p.set_defaults(func=run)
