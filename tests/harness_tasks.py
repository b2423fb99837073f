"""Small local lm-eval tasks written by tests: a multiple-choice task (12 MMLU-sample questions) and a
generation task (8 prompts), each a YAML + jsonl data file, all offline."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"

MC_YAML = """task: ll_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """task: ll_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(folder: Path) -> tuple[Path, Path]:
    """A 12-question multiple-choice task (from the MMLU sample) and an 8-prompt generation task."""
    rows = [json.loads(line) for line in (DATA / "mmlu_sample.jsonl").read_text().splitlines() if line.strip()][:12]
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": r["question"], "choices": r["choices"],
                                      "answer": r["answer"] if isinstance(r["answer"], int) else "ABCD".index(r["answer"])})
                          + "\n" for r in rows))
    gen = folder / "gen.jsonl"
    pairs = [("Who wrote Hamlet?", " Shakespeare"), ("What is two and two?", " four"), ("Say the king.", " the king"),
             ("Name a play.", " Macbeth"), ("What follows one?", " two"), ("Color of the sky?", " blue"),
             ("Where is Elsinore?", " Denmark"), ("Who is Juliet's love?", " Romeo")]
    gen.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    mc_yaml, gen_yaml = folder / "ll_local_mc.yaml", folder / "ll_local_gen.yaml"
    mc_yaml.write_text(MC_YAML.format(data=mc))
    gen_yaml.write_text(GEN_YAML.format(data=gen))
    return mc_yaml, gen_yaml
