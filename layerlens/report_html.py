"""A one-page, self-contained HTML report: what was analysed, what was removed and why, what it cost, and
the full provenance (model, data, settings, versions). Pure python + plotly (no streamlit); the figures are
the same builders the dashboard draws (:mod:`layerlens.plots`).
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import math
import platform
from pathlib import Path
from typing import Any

from . import humanize
from .dashboard.tables import current_marker
from .plans import plan_summary
from .plans.slm import merge_groups
from .plots import bi_bar, layer_strip, similarity_heatmap
from .plots_curves import sweep_figure
from .runs import atomic_write_text, provenance

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:24px auto;padding:0 16px;
color:#1f2933}
h1{margin-bottom:0}h2{border-bottom:2px solid #e4e7eb;padding-bottom:4px;margin-top:32px}
.sub{color:#616e7c;margin-top:4px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{border:1px solid #d9e2ec;border-radius:8px;padding:10px 16px;min-width:150px}
.card .v{font-size:1.5em;font-weight:600}.card .l{color:#616e7c;font-size:.85em}
table{border-collapse:collapse;font-size:.9em;margin:8px 0}td,th{border:1px solid #d9e2ec;padding:4px 8px;
text-align:left}th{background:#f5f7fa}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:8px}.mono{font-family:ui-monospace,Menlo,monospace}
footer{color:#9aa5b1;font-size:.8em;margin-top:40px}
.verdict{border-radius:8px;padding:10px 16px;margin:12px 0;font-weight:600}
.verdict.ok{background:#e3f9e5;color:#05400a}.verdict.bad{background:#ffe3e3;color:#8a041a;border:2px solid #d9534f}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else format(x, spec)
    return str(x)


def _card(value: Any, label: str) -> str:
    return f'<div class="card"><div class="v">{_esc(value)}</div><div class="l">{_esc(label)}</div></div>'


def _table(rows: list[tuple[Any, Any]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td class='mono'>{_esc(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


# Sweep columns for people: (header with unit, formatter).
_SWEEP_COLUMNS = {
    "strategy": ("strategy", str),
    "ratio": ("ratio asked", lambda v: f"{float(v):.2f}"),
    "actual_ratio": ("layers removed (%)", humanize.percent),
    "n_removed": ("layers removed", humanize.number),
    "removed_layers": ("which layers (0-based)", lambda v: str(v) if v == v and v is not None else "–"),
    "perplexity": ("perplexity (lower is better)", humanize.perplexity),
    "mmlu_accuracy": ("MMLU accuracy (%)", humanize.percent),
    "healed": ("healed (LoRA)", lambda v: "yes" if str(v).strip().lower() in ("true", "1", "1.0") else "no"),
}


def _sweep_table(frame: Any) -> str:
    cols = [c for c in _SWEEP_COLUMNS if c in frame.columns]
    head = "".join(f"<th>{_esc(_SWEEP_COLUMNS[c][0])}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_SWEEP_COLUMNS[c][1](row[c]))}</td>" for c in cols) + "</tr>"
                   for _, row in frame.iterrows())
    return f"<table><tr>{head}</tr>{body}</table>"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("layerlens", "torch", "transformers", "plotly"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_report_html(report: Any, *, plan: Any = None, model_info: dict[str, Any] | None = None,
                      quick: dict[str, Any] | None = None, original: dict[str, Any] | None = None,
                      sweep_frame: Any = None, reason: str | None = None, threshold: float = 0.9,
                      params_before: int | None = None, params_after: int | None = None,
                      title: str | None = None) -> str:
    """The report as one HTML string (plotly.js embedded once, so it opens offline).

    ``quick``/``original``: the dashboard's quick before/after numbers (``perplexity``, ``tokens_per_s``,
    ``windows``, ``seq_len``); ``sweep_frame``: a sweep DataFrame; ``reason``: why these layers.
    """
    meta = dict(report.meta)
    info = dict(model_info or {})
    model_name = info.get("model") or meta.get("model") or "model"
    figs: list[tuple[str, Any]] = []
    removed = tuple(plan.removed_layers) if plan is not None else ()
    figs.append(("Per-layer Block Influence", bi_bar(report, "bi", highlight=removed)))
    for name, kind in (("Cosine similarity", "cosine"), ("Linear CKA", "cka")):
        groups = merge_groups(report, kind, threshold)
        figs.append((name, similarity_heatmap(report, kind, threshold=threshold, groups=groups)))
    if plan is not None:
        figs.append(("Plan", layer_strip(plan_summary(plan))))
    if sweep_frame is not None and len(sweep_frame):
        curves = sweep_frame[sweep_frame["strategy"] != "current"]
        def cur(metric: str) -> dict[str, Any] | None:
            return current_marker(sweep_frame, plan, metric)

        figs.append(("Perplexity sweep", sweep_figure(curves, "perplexity", current=cur("perplexity"))))
        if sweep_frame["mmlu_accuracy"].notna().any():
            figs.append(("MMLU sweep", sweep_figure(curves, "mmlu_accuracy", current=cur("mmlu_accuracy"))))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title or 'LayerLens report')}</title>"
             f"<style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{_esc(title or 'LayerLens report')}</h1>")
    parts.append(f"<p class='sub'>Model <b>{_esc(model_name)}</b> · {report.num_layers} decoder layers · "
                 f"layer indices are 0-based</p>")

    verdict = humanize.verdict((quick or {}).get("perplexity"), (original or {}).get("perplexity"))
    if quick and original and verdict.level != "unknown":
        parts.append(f"<p class='verdict {'bad' if verdict.bad else 'ok'}'>{_esc(verdict.headline())}</p>")

    cards = [_card(f"{report.num_layers}", "layers in the model")]
    if plan is not None:
        cards.append(_card(f"{plan.num_layers_after}", f"layers after pruning (−{plan.n_removed})"))
        cards.append(_card(humanize.percent(plan.ratio), "pruning ratio (layers removed)"))
    if params_before and params_after:
        cards.append(_card(humanize.params(params_after),
                           f"parameters (was {humanize.params(params_before)}, "
                           f"-{humanize.percent(1 - params_after / params_before)})"))
    if quick and original:
        cards.append(_card(humanize.perplexity(quick["perplexity"]),
                           f"perplexity (was {humanize.perplexity(original['perplexity'])}, "
                           f"{humanize.change(quick['perplexity'], original['perplexity'])})"))
        if original.get("tokens_per_s"):
            change = (humanize.change(quick["speedup"], 1.0) if quick.get("speedup")
                      else humanize.change(quick["tokens_per_s"], original["tokens_per_s"]))
            cards.append(_card(
                humanize.tokens_per_s(quick["tokens_per_s"], quick.get("tokens_per_s_spread")),
                f"generation speed (was {humanize.tokens_per_s(original['tokens_per_s'])}, {change}"
                + ("; no win: the model is " + verdict.level if verdict.bad else "") + ")"))
    parts.append("<div class='cards'>" + "".join(cards) + "</div>")

    if plan is not None:
        parts.append("<h2>What is removed and why</h2>")
        parts.append(f"<p class='mono'>{_esc(plan.describe())}</p>")
        if reason:
            parts.append(f"<p>{_esc(reason)}</p>")
    if quick and original:
        parts.append(f"<p class='sub'>Quick check: perplexity on {quick.get('windows')} held-out windows × "
                     f"{quick.get('seq_len')} tokens, greedy generation speed on this machine.</p>")

    parts.append("<h2>Figures</h2><div class='grid'>")
    for i, (name, fig) in enumerate(figs):
        div = fig.to_html(include_plotlyjs=(i == 0), full_html=False, default_height="460px",
                          div_id=f"fig{i}", config={"displaylogo": False})
        wide = name in ("Plan", "Per-layer Block Influence")
        style = " style='grid-column:1 / span 2'" if wide else ""
        parts.append(f"<div{style}>{div}</div>")
    parts.append("</div>")

    parts.append("<h2>Per-layer metrics</h2><p class='sub'>All four metrics are unitless; layer indices are "
                 "0-based.</p><table><tr><th>layer</th><th>BI</th><th>Relative Magnitude</th>"
                 "<th>cos(h_i, h_i+1)</th><th>CKA(h_i, h_i+1)</th><th>plan</th></tr>")
    status = {r["layer"]: r for r in plan_summary(plan)} if plan is not None else {}
    for i in range(report.num_layers):
        st = status.get(i, {}).get("status", "")
        into = status.get(i, {}).get("into")
        st_text = f"merged into {into}" if st == "merged" else st
        parts.append(f"<tr><td>{i}</td><td>{report.bi[i]:.4f}</td><td>{report.magnitude[i]:.4f}</td>"
                     f"<td>{report.cosine[i][i + 1]:.4f}</td><td>{report.cka[i][i + 1]:.4f}</td>"
                     f"<td>{_esc(st_text)}</td></tr>")
    parts.append("</table>")

    if sweep_frame is not None and len(sweep_frame):
        parts.append("<h2>Sweep points</h2>")
        parts.append(_sweep_table(sweep_frame))

    prov = provenance(exported_by="layerlens dashboard")
    parts.append("<h2>Provenance</h2><div class='grid'><div><h3>Model</h3>")
    parts.append(_table([(k, v) for k, v in info.items()] or [("model", model_name)]))
    parts.append("<h3>Analysis</h3>")
    parts.append(_table([(k, v) for k, v in meta.items()] + [("cka_estimator", report.cka_estimator)]))
    parts.append("</div><div>")
    if plan is not None:
        parts.append("<h3>Plan</h3>")
        parts.append(f"<pre class='mono'>{_esc(json.dumps(plan.to_dict(), indent=1))}</pre>")
    parts.append("<h3>Software</h3>")
    parts.append(_table(list(_versions().items()) + [("report created", prov.get("created")),
                                                     ("git commit", prov.get("git_commit"))]))
    parts.append("</div></div>")
    parts.append("<footer>Generated by LayerLens. Metrics: Block Influence and Relative Magnitude (ShortGPT), "
                 "angular block distance (Gromov et al.), cosine/CKA between residual states (LLM-Streamline, "
                 "SLM).</footer></body></html>")
    return "".join(parts)


def save_report_html(path: str | Path, report: Any, **kwargs: Any) -> Path:
    return atomic_write_text(Path(path), build_report_html(report, **kwargs))
