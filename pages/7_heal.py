"""Heal: fine-tune the applied pruned model with LoRA for a time budget, distilling from the original (or
with next-token loss), while a live loss curve and held-out perplexity show how it goes; Stop keeps the
best checkpoint. Then the before/after table: original, pruned, healed.

The original (the teacher) is the cached model every session shares: healing runs under its lock and
leaves it bit-identical (``layerlens.heal``). A finished request (model, plan, texts, settings) is saved in
the runs folder and read back at once, here, in the CLI (``layerlens heal``) and in sweeps alike.
"""

from __future__ import annotations

import streamlit as st

from layerlens import humanize
from layerlens.dashboard.healing import (
    DEMO_SECONDS,
    LOSS_CHOICES,
    LOSS_LABELS,
    MMLU_PER_SUBJECT,
    TARGET_CHOICES,
    TARGET_LABELS,
    heal_config,
)
from layerlens.heal import HealConfig
from pages._ui import errors, healing, jobs, keys, resources, session

report = jobs.report_page(__file__, "Heal")
ss = st.session_state

shared = jobs.model_or_stop()
if shared.layerwise:  # training cannot run one layer at a time from disk
    st.info("Healing cannot run in layer-by-layer mode: it trains the pruned model with the original as teacher, "
            "so both must be in memory, and this model does not fit here. Save the pruned model on **Export** "
            "(written layer by layer) and heal it with `layerlens heal` on a machine where it fits (a pruned "
            "model may fit here: open the saved folder on **Model & data**).", icon=":material/info:")
    st.page_link("pages/5_export.py", label="Go to Export", icon=":material/save:")
    session.stop_page()

pruned = ss.get(keys.SS_PRUNED)
if pruned is None:
    st.info("No pruned model to heal yet: choose a plan on **Prune** and press **Apply plan**, then come back "
            "here.", icon=":material/info:")
    st.page_link("pages/3_prune.py", label="Go to Prune", icon=":material/content_cut:")
    session.stop_page()

plan = pruned["plan"]
model_key = session.current_settings().model_key()
st.markdown(f"Healing the applied plan `{plan.describe()}` ({plan.num_layers_after} of {plan.num_layers} layers "
            "kept): small LoRA adapters on the attention and MLP projections are trained so the pruned model "
            "recovers what the removed layers did, then merged into its weights (plain transformers, no peft).")

# ---- how to heal ------------------------------------------------------------------------------------------
busy = healing.running()
with st.container(border=True):
    c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 2, 2])
    loss = c1.selectbox("Loss", LOSS_CHOICES, format_func=LOSS_LABELS.get, key="hl_loss", persist_state="session",
                        help="kd: the pruned model learns the original's next-token distribution (the teacher is "
                             "the original you loaded); lm: plain next-token loss on the text; both: half each.")
    seconds = c2.number_input("Time budget (s)", 5, 3600, DEMO_SECONDS, step=5, key="hl_seconds",
                              persist_state="session",
                              help="Training stops after this many seconds; the best checkpoint is kept.")
    rank = c3.number_input("LoRA rank", 1, 512, 8, key="hl_rank", persist_state="session",
                           help="Size of each adapter: higher learns more, trains slower (alpha is twice the rank).")
    lr = c4.number_input("Learning rate", 1e-6, 1e-1, 5e-4, step=1e-4, format="%.0e", key="hl_lr",
                         persist_state="session", help="AdamW step size, with warm-up and a cosine decay.")
    targets = c5.radio("LoRA on", TARGET_CHOICES, format_func=TARGET_LABELS.get, key="hl_targets",
                       persist_state="session",
                       help="Every layer's projections, or only the layers just below and above each cut.")
    with st.expander("Advanced"):
        a1, a2, a3 = st.columns(3)
        steps = a1.number_input("Step limit (0 = the time budget alone)", 0, 100_000, 0, key="hl_steps",
                                persist_state="session", help="Stop after this many optimizer steps, or at the "
                                "time budget, whichever comes first.")
        every = a2.number_input("Held-out checkpoint every (steps)", 1, 10_000, HealConfig.eval_every,
                                key="hl_every", persist_state="session",
                                help="Held-out perplexity is measured this often; the best checkpoint is kept.")
        on_gpu = str(shared.info.device).startswith("cuda")  # MMLU costs ~40 s per model on a 2-core CPU
        mmlu_n = a3.number_input("MMLU questions per subject in the table (0 = skip)", 0, 10,
                                 MMLU_PER_SUBJECT if on_gpu else 0, key="hl_mmlu", persist_state="session",
                                 help="57 subjects: 1 per subject scores 57 questions per model (seconds on a GPU, "
                                      "about 40 s per model on a small CPU; the original's and the pruned model's "
                                      "scores are kept for the next heal of this plan).")
    start = st.button("Heal", type="primary", icon=":material/healing:", key="hl_run", disabled=busy,
                      help="Trains in the background (a page change does not stop it); Stop keeps the best so far.")
    st.caption("Training text: the analysis' data (the calibration plays by default); held-out perplexity: the "
               "evaluation plays, disjoint from it. The budget counts training only: measuring the models before "
               "and after adds a little. Every finished request is saved in the runs folder: the same request "
               "again is read back instantly instead of retrained.")

if start:
    with errors.guarded("starting to heal"):
        config = heal_config(loss=loss, seconds=seconds, steps=steps, lora_rank=rank, lr=lr, targets=targets,
                             eval_every=every, hidden_size=shared.info.hidden_size)
        train, _ = resources.resolve_texts(session.current_settings())
        healing.start(shared, pruned, config, train, model_key=model_key, mmlu_per_subject=int(mmlu_n))

job = ss.get(keys.SS_HEAL_JOB)
if job is not None and not job.taken:
    healing.follow(job)

healed = healing.current(pruned, model_key)
if healed is None:
    st.info("Not healed yet: press **Heal**. A loss curve and the held-out perplexity show how training goes; "
            "**Stop** keeps the best checkpoint so far.", icon=":material/info:")
    session.stop_page()

record = healed["record"]
if healed["cached"]:
    st.info("Read back from the runs folder: this very request (model, plan, texts and settings) was healed "
            "before, so nothing was retrained.", icon=":material/history:")
elif record["stopped"] != "budget":
    st.warning(f"Stopped at step {record['steps']}: the best checkpoint so far (step {record['best_step']}, held-out "
               f"perplexity {humanize.perplexity(record['ppl_after'])}) is kept. A stopped run is not saved in the "
               "runs folder; press **Heal** again for the full budget.", icon=":material/stop_circle:")
st.caption(healing.describe(record))
healing.show_curve(record, key="hl_curve")
st.subheader("Before and after")
healing.show_comparison(healed)
st.page_link("pages/5_export.py", label="Save the healed model on **Export**", icon=":material/save:")
