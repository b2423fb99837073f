"""LayerLens: find and remove redundant layers in transformer language models.

The public API, in the order a user meets it::

    lm = load_model("default")                              # folder, hub id, or the bundled model
    report = analyze(lm.model, lm.tokenizer, load_texts("default"))
    plan = make_plan("bi", report, ratio=0.25)              # or slm_plan(report, threshold=0.9)
    small = apply_plan(lm.model, plan)                      # a new model; the original is untouched
    perplexity(small, lm.tokenizer, load_texts("default", role="eval"))
"""

__version__ = "0.1.0"

from .data import TextSet, load_texts  # noqa: E402
from .errors import LayerLensError  # noqa: E402
from .evaluation import MMLUResult, PerplexityResult, mmlu, perplexity  # noqa: E402
from .loading import LoadedModel, ModelInfo, load_model  # noqa: E402
from .metrics import CaptureConfig, analyze  # noqa: E402
from .plans import PrunePlan, make_plan, plan_summary, slm_plan  # noqa: E402
from .plans.probed import laco_plan, slm_output_plan  # noqa: E402
from .questions import Question, QuestionSet, load_dev, load_questions  # noqa: E402
from .report import LayerReport  # noqa: E402
from .surgery import apply_plan, private_view, pruned  # noqa: E402
from .sweep import sweep  # noqa: E402  (the function; `from layerlens.sweep import ...` still reaches the module)

__all__ = [
    "CaptureConfig", "LayerLensError", "LayerReport", "LoadedModel", "MMLUResult", "ModelInfo",
    "PerplexityResult", "PrunePlan", "Question", "QuestionSet", "TextSet", "analyze", "apply_plan",
    "laco_plan", "load_dev", "load_model", "load_questions", "load_texts", "make_plan", "mmlu", "perplexity",
    "plan_summary", "private_view", "pruned", "slm_output_plan", "slm_plan", "sweep",
]
