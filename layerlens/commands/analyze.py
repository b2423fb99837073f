"""`layerlens analyze`: per-layer redundancy metrics to DIR/report.json and a readable table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..capture import LAST_STATES
from ..cli import (
    add_data_args,
    add_layerwise_args,
    add_model_args,
    add_runs_arg,
    analyze_from_args,
    load_from_args,
)
from ..metrics import BLOCK_DISTANCES
from ..runs import default_runs_dir, stable_key


def format_table(report) -> str:
    """BI (with its bootstrap interval and rank stability when measured), Relative Magnitude, neighbour
    similarities and the attention / MLP sublayer BIs per layer, 0-based."""
    order = sorted(range(report.num_layers), key=lambda i: (report.bi[i], i))
    rank = {layer: r + 1 for r, layer in enumerate(order)}
    ci = report.bi_ci_low is not None and report.bi_ci_high is not None
    subs = report.attn_bi is not None and report.mlp_bi is not None
    stab = report.rank_stability is not None
    k = (report.meta.get("bootstrap") or {}).get("rank_k")
    lines = [f"{'layer':>5}  {'BI':>8}  {'rank':>4}" + (f"  {'BI 95% CI':>17}" if ci else "")
             + (f"  {f'in {k} lowest':>11}" if stab else "")
             + f"  {'magnitude':>9}  {'cos(h_i,h_i+1)':>14}  {'CKA(h_i,h_i+1)':>14}"
             + (f"  {'attn BI':>8}  {'MLP BI':>8}" if subs else "")]
    for i in range(report.num_layers):
        lines.append(f"{i:>5}  {report.bi[i]:>8.5f}  {rank[i]:>4}"
                     + (f"  {report.bi_ci_low[i]:>8.5f}-{report.bi_ci_high[i]:<8.5f}" if ci else "")
                     + (f"  {report.rank_stability[i]:>11.0%}" if stab else "")
                     + f"  {report.magnitude[i]:>9.5f}  {report.cosine[i][i + 1]:>14.5f}  {report.cka[i][i + 1]:>14.5f}"
                     + (f"  {report.attn_bi[i]:>8.5f}  {report.mlp_bi[i]:>8.5f}" if subs else ""))
    m = report.meta
    if not subs and str(m.get("sublayers", "")).startswith("none"):
        lines.append(f"sublayers: {m['sublayers']}")
    conventions = []
    if m.get("last_state") not in (None, "pre-norm"):
        conventions.append(f"last state {m['last_state']}")
    if m.get("block_distance") not in (None, "all-tokens"):
        conventions.append(f"block distance {m['block_distance']}")
    if conventions:
        lines.append("conventions: " + ", ".join(conventions))
    lines.append(f"{report.num_layers} layers; {m.get('samples')} samples, {m.get('tokens')} tokens "
                 f"(seq-len {m.get('seq_len')}) from {m.get('data_description') or m.get('data')}; CKA: {report.cka_estimator}; "
                 f"{m.get('seconds')} s on {m.get('device')} ({m.get('dtype')}).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    loaded = load_from_args(args)
    report = analyze_from_args(args, loaded)
    path = report.save(Path(args.out) / "report.json")
    runs = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    key = stable_key({k: v for k, v in report.meta.items() if k not in ("created", "seconds")})
    report.save(runs / "analyze" / f"{key}.json")
    print(format_table(report))
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="measure per-layer redundancy (BI, cosine, CKA, block distance, magnitude)")
    add_model_args(p)
    add_layerwise_args(p)
    add_data_args(p)
    add_runs_arg(p)
    g = p.add_argument_group("confidence and peer conventions")
    g.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the calibration samples for BI intervals and rank stability "
                        "(0: off; default 1000, from per-sample sums of the same pass)")
    g.add_argument("--rank-k", type=int, default=None,
                   help="rank stability counts how often each layer is among the k lowest BI (default L/4)")
    g.add_argument("--last-state", choices=LAST_STATES, default="pre-norm",
                   help="pre-norm (default): h_L is the last layer's raw output; post-norm: after the final norm, "
                        "as ShortGPT reads it (the last layer's BI then matches ShortGPT's published numbers)")
    g.add_argument("--block-distance", choices=BLOCK_DISTANCES, default="all-tokens",
                   help="all-tokens (default): angular block distance over every token; last-token: each sample's "
                        "last token only, as PruneMe / Gromov et al.'s code")
    p.add_argument("--out", required=True, help="output folder for report.json")
    p.set_defaults(func=run)
