"""`layerlens compare`: rankings of one model's reports on different calibration sets, side by side, with
Kendall tau between them and a rank-difference heatmap."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..calibration_compare import DEFAULT_METRIC, compare_reports, format_comparison, load_reports
from ..damage import METRICS
from ..runs import atomic_write_json, atomic_write_text


def run(args: argparse.Namespace) -> int:
    from ..plots_trust import rank_difference_heatmap  # plotly: only when the command runs

    reports, labels = load_reports(args.reports)
    comp = compare_reports(reports, labels, metric=args.metric, k=args.k)
    print(format_comparison(comp))
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / "compare.json", comp.to_dict() | {"reports": [str(p) for p in args.reports]})
        fig = rank_difference_heatmap(comp)
        atomic_write_text(out / "compare_heatmap.html", fig.to_html(include_plotlyjs="cdn", full_html=True))
        atomic_write_text(out / "compare_heatmap.json", fig.to_json())
        print(f"wrote {out / 'compare.json'}, {out / 'compare_heatmap.html'} and {out / 'compare_heatmap.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare one model's rankings on different calibration sets (reports "
                                       "from `layerlens analyze --data ...`): Kendall tau and a heatmap")
    p.add_argument("reports", nargs="+", metavar="REPORT",
                   help="two or more report.json files (or folders holding one) of the same model")
    p.add_argument("--metric", default=DEFAULT_METRIC, choices=list(METRICS),
                   help="the metric to rank layers by (default: bi)")
    p.add_argument("--k", type=int, default=None, help="how many most-redundant layers to compare (default L/4)")
    p.add_argument("--out", default=None, help="folder for compare.json and the heatmap (.html and plotly .json)")
    p.set_defaults(func=run)
