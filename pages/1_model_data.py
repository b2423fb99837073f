"""Model & data: pick a model and calibration data, analyze with progress; model card + first look."""

from __future__ import annotations

import streamlit as st

from layerlens import humanize
from layerlens.dashboard.paths import MAX_UPLOAD_MB, check_model_spec, data_root, default_model_spec
from layerlens.dashboard.settings import DATA_SOURCE_LABELS, DATA_SOURCES, DTYPE_OPTIONS, AnalysisSettings
from layerlens.defaults import DEFAULT_MODEL_ID, DEFAULT_MODEL_LABEL
from layerlens.metrics import CaptureConfig
from layerlens.plans.slm import merge_groups
from layerlens.plots import bi_bar, similarity_heatmap
from pages._ui import errors, jobs, keys, resources, session, widgets

session.require_router(__file__)

st.title("Model & data")
st.caption("Load a causal LM, run calibration text through it once, and measure how much each layer changes "
           "the residual stream. Layer indices are 0-based everywhere, as in the `layerlens` CLI.")

ss = st.session_state
req = session.requested_settings()
server_default = default_model_spec()
default_label = DEFAULT_MODEL_LABEL if server_default == DEFAULT_MODEL_ID else f"Server default ({server_default})"

# ---- first visit: a quick analysis of the bundled default, no typing ---------------------------------------
jobs.ensure_report(auto=True, quiet=True)
cancel_note = st.empty()  # a fixed slot, like ensure_report's: the widgets below never shift between reruns
if ss.pop(keys.SS_CANCELLED, False):
    cancel_note.warning("Analysis cancelled; the results on screen (if any) are from the previous analysis.",
                        icon=":material/stop_circle:")

# ---- settings --------------------------------------------------------------------------------------------
with st.container(border=True):
    c1, c2 = st.columns(2, gap="large")
    with c1:
        st.subheader("Model")
        sources = {"default": default_label, "hub": "Hugging Face hub id", "local": "Local folder on the server"}
        initial = "default" if req.model in (DEFAULT_MODEL_ID, server_default) else \
            "hub" if "/" in req.model and not req.model.startswith(("/", ".")) else "local"
        src = st.radio("Model source", list(sources), format_func=sources.get, key="md_model_source",
                       index=list(sources).index(initial), persist_state="session")
        model = server_default
        revision = None
        if src == "hub":
            model = st.text_input("Hub id", value=req.model if initial == "hub" else "",
                                  placeholder="HuggingFaceTB/SmolLM2-135M", key="md_hub_id",
                                  persist_state="session").strip()
            revision = st.text_input("Revision (branch, tag or commit; optional)", value=req.revision or "",
                                     key="md_revision", persist_state="session").strip() or None
        elif src == "local":
            model = st.text_input(f"Model folder (under {data_root()})", value=req.model if initial == "local"
                                  else "", placeholder="models/my-model", key="md_local_path",
                                  persist_state="session").strip()
        d1, d2 = st.columns(2)
        dtype = d1.selectbox("dtype", DTYPE_OPTIONS, index=DTYPE_OPTIONS.index(req.dtype), key="md_dtype",
                             help="auto: bfloat16/float16 on a GPU, float32 on CPU", persist_state="session")
        import torch

        devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
            (["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else [])
        device = d2.selectbox("Device", devices, key="md_device", persist_state="session",
                              help="auto: the GPU when there is one, else the CPU")
        trust = st.checkbox("Trust remote code", value=False, key="md_trust", persist_state="session",
                            help="Runs Python code from the model repository. Off by default.")
        if trust:
            st.warning("Remote code runs with the server's permissions. Enable it only for model authors you "
                       "trust.", icon=":material/warning:")
    with c2:
        st.subheader("Calibration data")
        data_src = st.selectbox("Source", DATA_SOURCES, format_func=DATA_SOURCE_LABELS.get, key="md_data_source",
                                persist_state="session",
                                index=DATA_SOURCES.index(req.data) if req.data in DATA_SOURCES else 0)
        data = data_src
        text_field = "text"
        if data_src == "default":
            from layerlens.defaults import shakespeare_corpus

            with errors.guarded("reading the bundled corpus"):
                st.caption(shakespeare_corpus("calibration").description)
        elif data_src == "upload":
            up = st.file_uploader(f"Text file (.txt, .jsonl, .json, .csv, .parquet; ≤ {MAX_UPLOAD_MB} MB)",
                                  type=["txt", "md", "jsonl", "json", "csv", "parquet"], key="md_upload")
            data = ""
            if up is not None:
                with errors.guarded("reading the upload"):
                    info = resources.save_upload(up)
                    data = f"upload:{info['sha']}"
                    st.caption(f"Uploaded {info['name']} (kept in this session only).")
        elif data_src == "path":
            p = st.text_input(f"File path (under {data_root()})", key="md_data_path", persist_state="session",
                              placeholder="data/calibration.jsonl").strip()
            data = f"path:{p}" if p else ""
        elif data_src == "hub":
            h = st.text_input("Dataset name[:config][:split]", key="md_data_hub", persist_state="session",
                              placeholder="wikitext:wikitext-2-raw-v1:test").strip()
            data = f"hub:{h}" if h else ""
        if data_src in ("upload", "path", "hub"):
            text_field = st.text_input("Text field / column", value="text", key="md_text_field",
                                       persist_state="session")
        s1, s2, s3 = st.columns(3)
        samples = s1.number_input("Samples", min_value=1, max_value=4096, value=req.capture.samples, step=8,
                                  key="md_samples", persist_state="session",
                                  help="Number of calibration texts (more = steadier metrics, slower)")
        seq_len = s2.number_input("Sequence length", min_value=8, max_value=8192, value=req.capture.seq_len, step=64,
                                  key="md_seq_len", persist_state="session", help="Tokens per text")
        batch = s3.number_input("Batch size", min_value=1, max_value=256, value=req.capture.batch_size, step=1,
                                key="md_batch", persist_state="session")
        c1, c2 = st.columns(2)
        cka = c1.radio("CKA estimator", ["minibatch", "exact"], horizontal=True, key="md_cka",
                       persist_state="session",
                       help="minibatch: unbiased HSIC per sample (any model size); exact: feature-space "
                            "(small models only)")
        skip = c2.number_input("Skip first tokens", min_value=0, max_value=8191, value=req.capture.skip_first, step=1,
                               key="md_skip_first", persist_state="session",
                               help="Leave the first N tokens of every sample out of the metrics (they still "
                                    "run as context). 1 drops an attention-sink first token, whose huge norm "
                                    "otherwise dominates CKA (SmolLM2: CKA(h11, h12) 0.03 -> 0.99).")

    capture = CaptureConfig(samples=int(samples), seq_len=int(seq_len), batch_size=int(batch), cka_estimator=cka,
                            skip_first=int(skip))
    settings = AnalysisSettings(model=model or "", revision=revision, dtype=dtype, device=device,
                                trust_remote_code=trust, data=data, data_label=data, text_field=text_field,
                                capture=capture)
    go = st.button("Analyze", type="primary", key="md_analyze", icon=":material/play_arrow:")

action = st.empty()  # the Analyze click's one slot: its status or error replaces the last click's, never stacks
if go:
    with action.container():
        if not settings.model:
            st.error("Enter a model: a hub id like org/name or a folder under the data root.", icon=":material/error:")
        elif not settings.data:
            st.error("Choose calibration data: upload a file, or type a path or dataset name.", icon=":material/error:")
        else:
            checked = None
            with errors.guarded("checking the model"):  # "Local folder" means a folder, whatever its shape
                checked = check_model_spec(settings.model, local=src == "local")
            if checked is not None:
                jobs.run_analysis(settings)

# ---- model card + first look -----------------------------------------------------------------------------
report = session.current_report()
info = ss.get(keys.SS_MODEL_INFO)
if report is not None and info is not None:
    st.subheader("Model card")
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}.get(info["dtype"], 4)
    m1, m2, m3, m4, m5 = st.columns(5)
    m1.metric("Architecture", info["architecture"].replace("ForCausalLM", ""), help=info["model_type"])
    m2.metric("Decoder layers", info["num_layers"])
    m3.metric("Parameters", humanize.params(info["num_parameters"]))
    mb = info["num_parameters"] * bytes_per / 2**20
    # the dtype as the weights' delta line: "cpu · float32" in one fifth of the page was cut to "cpu · floa…"
    m4.metric("Weights in memory", f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2f} MB", delta=info["dtype"],
              delta_color="off", delta_arrow="off")
    m5.metric("Device", info["device"])
    st.caption(f"Model `{info['model']}` ({info['source_path']}) · hidden size {info['hidden_size']} · "
               f"max positions {info['max_positions']}")
    st.caption("Analysis: " + widgets.report_caption(report) + f" · {report.meta.get('seconds', '?')} s")
    if report.meta.get("execution") == "layerwise":
        st.info("This model is larger than the memory here, so it was analysed **layer by layer**: one decoder "
                "layer's weights in memory at a time, the same numbers as in memory.", icon=":material/layers:")

    st.subheader("First look")
    f1, f2 = st.columns([1, 1])
    with f1:
        widgets.chart(similarity_heatmap(report, "cosine", threshold=0.9, groups=merge_groups(report, "cosine", 0.9)), key="md_heatmap")
    with f2:
        widgets.chart(bi_bar(report, "bi"), key="md_bi")
    st.page_link("pages/2_redundancy.py", label="Explore the heatmaps and thresholds on **Redundancy**", icon=":material/grid_on:")
    st.page_link("pages/3_prune.py", label="Choose layers to remove on **Prune**", icon=":material/content_cut:")
