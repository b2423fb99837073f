"""The built-in strategy table: every strategy LayerLens knows, one :class:`Strategy` entry each.

Labels, colours, reasons, what each needs and its parameters are read from here by the CLI (choices,
help, argument checks), the dashboard (pickers, share links, Summary), the plots (curve colours) and the
sweeps (defaults). The builders live in the modules named after what they do.
"""

from __future__ import annotations

from .plan import DEFAULT_MERGE_FORMULA, MERGE_FORMULAS
from .ranking import (
    build_attn_bi,
    build_bi,
    build_block,
    build_magnitude,
    build_manual,
    build_mlp_bi,
    build_random,
    build_reverse,
    build_sequential,
    build_streamline,
    fixed_reason,
    reason_attn_bi,
    reason_bi,
    reason_block,
    reason_mlp_bi,
    reason_streamline,
)
from .registry import RATIO, SEED, THRESHOLD, N, Param, Strategy, register
from .slm import DEFAULT_SLM_CRITERION, reason_slm


def reason_finercut(report: object, plan: object) -> str:
    params = getattr(plan, "params", {})
    sim = params.get("similarity")
    tail = f" (final-state cosine to the original {sim:.4f})" if isinstance(sim, float) else ""
    return (f"Chosen one sublayer at a time, each the one whose removal changed the model's final hidden states "
            f"least on the calibration texts{tail}: {getattr(plan, 'units_text', lambda: '')()} "
            "(a = attention, m = MLP).")

COUNT = (RATIO, N)
# Sublayer strategies count sublayers: a whole layer is two (see layerlens.plans.ranking).
SUB_COUNT = (Param("ratio", float, lo=0.0, hi=1.0, hi_open=True,
                   help="fraction of the model's 2L sublayers to drop: k = round(ratio * 2L)"),
             Param("n", int, lo=0, help="number of sublayers to drop (instead of ratio)"))
FORMULA = Param("formula", str, default=DEFAULT_MERGE_FORMULA, choices=MERGE_FORMULAS,
                help="merge formula (keep_top: each window's top layer; task_vector: the papers' formula, which "
                     "degrades windows of three or more layers; mean: the average)")

BUILT_IN = (
    Strategy("bi", "Block Influence (ShortGPT)", "#1f77b4",
             "the k lowest-BI layers (ShortGPT)", build_bi, reason_bi,
             needs_report=True, sweep_default=True, params=COUNT),
    Strategy("reverse", "Reverse order (last layers)", "#ff7f0e",
             "the last k layers (ShortGPT baseline)", build_reverse,
             fixed_reason("ShortGPT's 'reverse-order' baseline: the deepest layers are dropped first."),
             sweep_default=True, params=COUNT),
    Strategy("sequential", "Sequential (first layers)", "#2ca02c",
             "the first k layers (ShortGPT baseline)", build_sequential,
             fixed_reason("Baseline: the first layers are dropped."), sweep_default=True, params=COUNT),
    Strategy("magnitude", "Relative Magnitude", "#d62728",
             "the k lowest Relative-Magnitude layers", build_magnitude,
             fixed_reason("They change the hidden state least relative to its size (lowest Relative Magnitude)."),
             needs_report=True, sweep_default=True, params=COUNT),
    Strategy("random", "Random", "#7f7f7f",
             "k seeded random layers", build_random, fixed_reason("Chosen by the 'random' strategy."),
             on_prune_page=False, params=(*COUNT, SEED)),
    Strategy("block", "Most similar block (angular distance)", "#9467bd",
             "the contiguous n layers with the smallest angular block distance (Gromov et al.)",
             build_block, reason_block, needs_report=True, contiguous=True, params=COUNT),
    Strategy("streamline", "LLM-Streamline span (cosine)", "#8c564b",
             "the contiguous n layers whose input and output are most similar (LLM-Streamline)",
             build_streamline, reason_streamline, needs_report=True, contiguous=True, params=COUNT),
    Strategy("slm", "Sliding layer merging (SLM)", "#e377c2",
             "sliding layer merging: windows of similar consecutive layers merged into one",
             "layerlens.plans.probed:build_slm",
             reason_slm, size="threshold_or_ratio", needs_report=True, forward_criteria=("output",),
             on_prune_page=False,
             params=(THRESHOLD, RATIO, FORMULA,
                     Param("criterion", str, default=DEFAULT_SLM_CRITERION, choices=("cka", "cosine", "output"),
                           help="cka/cosine from the report (instant) or output (forward passes)"),
                     Param("keep_last", bool, default=True, help="never merge the last layer"))),
    Strategy("laco", "Layer Collapse (LaCo)", "#393b79",
             "Layer Collapse: merge the m following layers into a layer while the output stays similar",
             "layerlens.plans.probed:build_laco", fixed_reason("Chosen by the 'laco' strategy."),
             size="threshold", needs_data=True, on_prune_page=False,
             params=(THRESHOLD, FORMULA, Param("m", int, default=3, lo=1), Param("interval", int, default=1, lo=1),
                     Param("lowest", int, default=0, lo=0), Param("highest", int, lo=0))),
    Strategy("oracle", "Greedy by measured damage (oracle)", "#000000",
             "greedy: each step removes the layer whose removal raises the calibration perplexity least",
             "layerlens.damage:build_oracle",
             fixed_reason("Removed greedily by measured damage: each step dropped the layer whose removal raised "
                          "the calibration perplexity least (the upper reference for the metric strategies)."),
             needs_data=True,
             on_prune_page=False, params=COUNT),
    Strategy("attn_bi", "Attention sublayers (lowest attention BI)", "#bcbd22",
             "drop the k attention sublayers with the lowest attention BI (LLM-Drop); layers and MLPs stay",
             build_attn_bi, reason_attn_bi, needs_report=True, params=SUB_COUNT),
    Strategy("mlp_bi", "MLP sublayers (lowest MLP BI)", "#9edae5",
             "drop the k MLP sublayers with the lowest MLP BI; layers and attention stay",
             build_mlp_bi, reason_mlp_bi, needs_report=True, params=SUB_COUNT),
    Strategy("finercut", "Joint greedy over sublayers (FinerCut)", "#ff9896",
             "greedily drop, one at a time, the attention or MLP sublayer whose removal changes the final "
             "hidden states least on calibration data (FinerCut)",
             "layerlens.plans.probed:build_finercut", reason_finercut, needs_data=True, on_prune_page=False,
             params=SUB_COUNT),
    Strategy("manual", "Picked by hand", "#17becf",
             "the layers given by hand", build_manual, fixed_reason("Picked by hand on the Prune page."),
             size="layers", on_prune_page=False, params=(FORMULA,)),
)

for _entry in BUILT_IN:
    register(_entry)
