"""`layerlens analyze`: per-layer redundancy metrics to DIR/report.json and a readable table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_data_args, add_model_args, add_runs_arg, analyze_from_args, load_from_args
from ..runs import default_runs_dir, stable_key


def format_table(report) -> str:
    """BI, Relative Magnitude and neighbour similarities per layer, 0-based, lowest BI marked."""
    order = sorted(range(report.num_layers), key=lambda i: (report.bi[i], i))
    rank = {layer: r + 1 for r, layer in enumerate(order)}
    lines = [f"{'layer':>5}  {'BI':>8}  {'rank':>4}  {'magnitude':>9}  {'cos(h_i,h_i+1)':>14}  "
             f"{'CKA(h_i,h_i+1)':>14}"]
    for i in range(report.num_layers):
        lines.append(f"{i:>5}  {report.bi[i]:>8.5f}  {rank[i]:>4}  {report.magnitude[i]:>9.5f}  "
                     f"{report.cosine[i][i + 1]:>14.5f}  {report.cka[i][i + 1]:>14.5f}")
    m = report.meta
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
    add_data_args(p)
    add_runs_arg(p)
    p.add_argument("--out", required=True, help="output folder for report.json")
    p.set_defaults(func=run)
