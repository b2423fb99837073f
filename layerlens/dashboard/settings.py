"""What the dashboard loads and how it analyses it: :class:`AnalysisSettings` = model + data + a
:class:`~layerlens.metrics.CaptureConfig`. Its :meth:`~AnalysisSettings.key` names the persisted analysis."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

from ..errors import LayerLensError, for_interface
from ..loading import DTYPES
from ..metrics import CaptureConfig
from ..runs import stable_key
from .paths import default_model_spec

ENV_QUICK_SAMPLES = "LAYERLENS_QUICK_SAMPLES"

DTYPE_OPTIONS = ("auto", *DTYPES)
DATA_SOURCES = ("default", "prose", "upload", "path", "hub")
DATA_SOURCE_LABELS = {
    "default": "Bundled Shakespeare (default)",
    "prose": "Python docs prose (bundled)",
    "upload": "Upload a file",
    "path": "File on the server",
    "hub": "Hugging Face dataset",
}
# How the analysis settings' own checks name the capture parameters (see :meth:`AnalysisSettings.validate`).
CAPTURE_LABELS = {"samples": "Samples", "batch_size": "Batch size", "skip_first": "Skip-first tokens",
                  "seq_len": "the sequence length"}
# The dashboard's first analysis is small: real heatmaps in seconds on a CPU. It keeps the first token
# (skip_first 0, as the CLI): leaving the default model's attention sink out makes CKA readable but hides that
# layer 11 builds the sink, so BI removes it from 9 layers on (perplexity 607 vs 247 at ratio 0.3), while the
# default merge (cosine) gains at one ratio and loses at another (bench/bench_merge_defaults.py).
DASHBOARD_CAPTURE = CaptureConfig(samples=8, seq_len=128)
MIN_SEQ_LEN = 8


@dataclass(frozen=True)
class AnalysisSettings:
    """What to load (model, data) and how to analyse it (``capture``); :meth:`key` names the persisted result."""

    model: str = "default"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    data: str = "default"
    data_label: str = "default"
    text_field: str = "text"
    capture: CaptureConfig = DASHBOARD_CAPTURE

    @classmethod
    def quick(cls, model: str | None = None) -> AnalysisSettings:
        """The first-open analysis: small and fast (``$LAYERLENS_QUICK_SAMPLES`` samples, default 8)."""
        samples = int(os.environ.get(ENV_QUICK_SAMPLES, "8") or 8)
        return cls(model=model or default_model_spec(), capture=replace(DASHBOARD_CAPTURE, samples=samples))

    def model_key(self) -> tuple[str, str | None, str, str]:
        """The cache key of the loaded model (one cached copy per key, shared by every session)."""
        return (self.model, self.revision or None, self.dtype, self.device)

    def key(self, data_fingerprint: str = "") -> str:
        """The name of the persisted analysis: every setting but the data's display label, the capture
        fields flat beside them (as they were before ``capture`` was its own object: saved analyses keep
        their names), and the data's fingerprint."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("data_label", "capture")}
        d.update(asdict(self.capture))
        if not d["skip_first"]:  # keys of analyses saved before the option existed stay valid
            d.pop("skip_first")
        defaults = CaptureConfig()
        for name in ("sublayers", "bootstrap", "ci_level", "rank_k", "last_state", "block_distance"):
            if name in d and d[name] == getattr(defaults, name):  # the same for the issue-17 fields
                d.pop(name)
        d["data_fingerprint"] = data_fingerprint
        return stable_key(d)

    def validate(self) -> None:
        """:meth:`CaptureConfig.validate`, named in the dashboard's words, plus the dashboard's own limits."""
        try:
            self.capture.validate()
        except LayerLensError as exc:
            raise type(exc)(for_interface(str(exc), CAPTURE_LABELS)) from exc
        if self.capture.seq_len < MIN_SEQ_LEN:
            raise LayerLensError(f"Sequence length must be at least {MIN_SEQ_LEN} tokens "
                                 f"(got {self.capture.seq_len}).")
        if self.dtype not in DTYPE_OPTIONS:
            raise LayerLensError(f"Unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPE_OPTIONS)}.")


__all__ = [
    "DASHBOARD_CAPTURE", "DATA_SOURCES", "DATA_SOURCE_LABELS", "DTYPE_OPTIONS", "ENV_QUICK_SAMPLES",
    "AnalysisSettings",
]
