"""MMLU-format questions: the bundled subset, the full bundled test set, local files, or a hub dataset.

Every source becomes a :class:`QuestionSet` of :class:`Question` rows in one canonical form
(``question``, four ``choices``, ``answer`` 0-3, snake_case ``subject``). Malformed rows are refused
with a :class:`~layerlens.errors.DataError` that names the row and the fix.

Accepted local formats (``.jsonl``, ``.json``, ``.csv``, ``.parquet``):

* ``question`` + ``choices`` (a list of 4, or a JSON list in a CSV cell) + ``answer`` + ``subject``;
* ``question`` + columns ``A``/``B``/``C``/``D`` (or ``answer_a`` ... ``answer_d``) instead of ``choices``;
* ``answer`` as an index 0-3 or a letter A-D (``correct_answer`` and ``target`` are accepted too);
* ``topic`` instead of ``subject``;
* the original header-less Hendrycks CSVs (``question,A,B,C,D,answer`` rows, subject from the file
  name, e.g. ``astronomy_test.csv``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import defaults
from .data import read_json, read_utf8
from .errors import DataError
from .runs import stable_key

LETTERS = ("A", "B", "C", "D")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question with exactly four choices."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int
    subject: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d


@dataclass(frozen=True)
class QuestionSet:
    """Questions plus where they came from (recorded in provenance and shown in the UI)."""

    questions: tuple[Question, ...]
    source: str
    description: str

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    @property
    def subjects(self) -> tuple[str, ...]:
        """Subjects in first-appearance order."""
        return tuple(dict.fromkeys(q.subject for q in self.questions))

    def identity(self) -> dict[str, Any]:
        """What the questions are, for cache keys: the source and a hash of every row."""
        return {"source": self.source, "n": len(self.questions),
                "rows": stable_key([q.to_dict() for q in self.questions])}


def subject_id(name: str) -> str:
    """``"High School Biology"`` / ``"high-school biology"`` -> ``"high_school_biology"``."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def parse_subjects(value: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` as subject ids; empty or None -> None (all)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    ids = [subject_id(s) for s in items if str(s).strip()]
    return ids or None


# --------------------------------------------------------------------------------------------------------
# Record validation
# --------------------------------------------------------------------------------------------------------


def _answer_index(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: answer {value!r} is not an index 0-3 or a letter A-D.")
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) <= 3:
        return int(value)
    text = str(value).strip()
    if text.upper() in LETTERS:
        return LETTERS.index(text.upper())
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise DataError(f"{where}: answer {value!r} is not an index 0-3 or a letter A-D; fix the row.")


def _choices_of(rec: Mapping[str, Any], where: str) -> tuple[str, str, str, str]:
    raw: Any = None
    if "choices" in rec and rec["choices"] is not None:
        raw = rec["choices"]
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: 'choices' must be a list of 4 strings (a JSON list in a CSV "
                                "cell), or use columns A, B, C, D.") from exc
        if hasattr(raw, "tolist"):  # numpy array from parquet
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)):
            raise DataError(f"{where}: 'choices' must be a list of 4 strings, got {type(raw).__name__}.")
    else:
        for names in (LETTERS, tuple(f"answer_{c}" for c in "abcd"), tuple(c.lower() for c in LETTERS)):
            if all(n in rec for n in names):
                raw = [rec[n] for n in names]
                break
    if raw is None:
        raise DataError(f"{where}: no choices; give a 'choices' list of 4 or columns A, B, C, D.")
    if len(raw) != 4:
        raise DataError(f"{where}: has {len(raw)} choices; MMLU questions need exactly 4.")
    if any(c is None for c in raw):
        raise DataError(f"{where}: a choice is empty (null); every question needs 4 choices.")
    return tuple(str(c) for c in raw)  # type: ignore[return-value]


def question_from_record(rec: Mapping[str, Any], where: str, default_subject: str | None = None) -> Question:
    """Validate one record (any accepted field naming) into a :class:`Question`."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: is not an object with question/choices/answer/subject fields.")
    text = rec.get("question")
    if text is None or not str(text).strip():
        raise DataError(f"{where}: missing 'question' field (or it is empty).")
    choices = _choices_of(rec, where)
    answer_key = next((k for k in ("answer", "correct_answer", "target") if rec.get(k) is not None), None)
    if answer_key is None:
        raise DataError(f"{where}: missing 'answer' field (an index 0-3 or a letter A-D).")
    answer = _answer_index(rec[answer_key], where)
    subject = rec.get("subject", rec.get("topic", default_subject))
    if subject is None or not str(subject).strip():
        raise DataError(f"{where}: missing 'subject' field (e.g. 'high_school_biology'); it names the "
                        "subject in the prompt.")
    return Question(str(text), choices, answer, subject_id(str(subject)))


def questions_from_records(records: Iterable[Mapping[str, Any]], source: str,
                           default_subject: str | None = None) -> list[Question]:
    """Validate records; errors name the row (1-based) of ``source``."""
    return [question_from_record(r, f"{source} row {i}", default_subject) for i, r in enumerate(records, 1)]


def _coerce(q: Question | Mapping[str, Any], i: int) -> Question:
    return q if isinstance(q, Question) else question_from_record(q, f"question {i}")


def as_questions(items: QuestionSet | Iterable[Question | Mapping[str, Any]]) -> tuple[Question, ...]:
    """Accept a QuestionSet, Questions, or canonical dicts (validated)."""
    if isinstance(items, QuestionSet):
        return items.questions
    return tuple(_coerce(q, i) for i, q in enumerate(items, 1))


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------


def _subject_from_filename(path: Path) -> str:
    return re.sub(r"_(test|dev|val|validation|train)$", "", path.stem)


def _read_csv(path: Path) -> list[Question]:
    rows = list(csv.reader(read_utf8(path).splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    if "question" in header:
        records = [dict(zip(header, r, strict=False)) for r in rows[1:]]
        return questions_from_records(records, str(path), default_subject=None)
    # Header-less Hendrycks format: question, A, B, C, D, answer; subject from the file name.
    subject = _subject_from_filename(path)
    out = []
    for i, r in enumerate(rows, 1):
        if len(r) != 6:
            raise DataError(f"{path} row {i}: has {len(r)} columns; a CSV needs a header with 'question' "
                            "(and choices/answer/subject columns) or six columns question,A,B,C,D,answer.")
        rec = {"question": r[0], "A": r[1], "B": r[2], "C": r[3], "D": r[4], "answer": r[5]}
        out.append(question_from_record(rec, f"{path} row {i}", subject))
    return out


def _read_file(path: Path) -> list[Question]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for i, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i} is not valid JSON ({exc.msg}); fix or remove it.") from exc
        return [question_from_record(r, f"{path} line {i}") for i, r in records]
    if suffix == ".json":
        obj = read_json(path)
        if isinstance(obj, dict):
            obj = obj.get("questions", obj.get("data", [obj]))
        return questions_from_records(obj, str(path))
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pandas as pd  # heavy (~0.3 s): only for .parquet files, not at import

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise DataError(f"'{path}' could not be read as Parquet ({type(exc).__name__}).") from exc
        return questions_from_records(frame.to_dict("records"), str(path),
                                      default_subject=_subject_from_filename(path))
    raise DataError(f"Unsupported MMLU file type '{suffix}'; use .jsonl, .json, .csv or .parquet.")


def _parse_hub(spec: str) -> tuple[str, str | None, str | None]:
    name, config, split = (spec.removeprefix("hub:").split(":") + [None, None])[:3]
    return name, config or None, split or None


def _read_hub(spec: str, split: str) -> list[Question]:
    name, config, split_in_spec = _parse_hub(spec)
    split = split_in_spec or split
    if name == "cais/mmlu" and config is None:
        config = "all"
    try:
        import datasets  # heavy: only for hub datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many network/file errors
        raise DataError(f"Could not load hub dataset '{name}' (config {config}, split {split}: "
                        f"{type(exc).__name__}); the hub may be unreachable (offline?): save it as a "
                        ".jsonl/.csv/.parquet file and pass the file, or use `mmlu=default`.") from exc
    default_subject = config if config not in (None, "all", "default") else None
    return questions_from_records(ds, f"hub:{name}", default_subject=default_subject)


def _looks_like_file(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_SUFFIXES


def _filter(questions: list[Question], subjects: list[str] | None, limit: int | None,
            source: str) -> list[Question]:
    if subjects is not None:
        present = dict.fromkeys(q.subject for q in questions)
        unknown = [s for s in subjects if s not in present]
        if unknown:
            shown = ", ".join(list(present)[:8]) + (", ..." if len(present) > 8 else "")
            raise DataError(f"Subject(s) {', '.join(unknown)} not in {source}; available: {shown}.")
        wanted = set(subjects)
        questions = [q for q in questions if q.subject in wanted]
    if limit is not None:
        if limit < 1:
            raise DataError(f"`limit` must be at least 1 (got {limit}).")
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            if seen.get(q.subject, 0) < limit:
                kept.append(q)
                seen[q.subject] = seen.get(q.subject, 0) + 1
        questions = kept
    return questions


def load_questions(spec: str = "default", *, subjects: str | Sequence[str] | None = None,
                   limit: int | None = None, split: str = "test", seed: int = 0) -> QuestionSet:
    """Load MMLU questions.

    ``spec``: ``default`` (the bundled, seeded, stratified subset: 10 per subject, 570 questions; with
    ``limit`` N it is N per subject), ``full`` (all 14,042 bundled test questions), a local
    ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or a hub dataset ``name[:config][:split]``
    (``hub:`` prefix optional; ``cais/mmlu`` uses config ``all``). ``subjects`` filters (names or
    ``"a,b"``), ``limit`` keeps the first N questions of each subject.
    """
    wanted = parse_subjects(subjects)
    if spec in ("default", "full"):
        if spec == "default":
            per_subject = limit if limit is not None else 10
            if per_subject < 1:
                raise DataError(f"`limit` must be at least 1 (got {limit}).")
            rows = defaults.load_default_mmlu("default", per_subject=per_subject, seed=seed)
            source = f"default (bundled MMLU test, {per_subject} per subject, seed {seed})"
        else:
            rows = defaults.load_default_mmlu("full")
            source = "full (bundled MMLU test set)"
        questions = questions_from_records(rows, source)
        questions = _filter(questions, wanted, None if spec == "default" else limit, source)
    else:
        path = Path(spec).expanduser()
        if path.exists():
            if path.is_dir():
                raise DataError(f"'{spec}' is a folder; pass a .jsonl, .json, .csv or .parquet MMLU file.")
            source = str(path)
            questions = _filter(_read_file(path), wanted, limit, source)
        elif _looks_like_file(spec):
            raise DataError(f"MMLU file '{spec}' does not exist; check the path (or use `mmlu=default`).")
        else:
            name, config, split_in_spec = _parse_hub(spec)
            source = f"hub:{name}" + (f":{config}" if config else "") + f":{split_in_spec or split}"
            questions = _filter(_read_hub(spec, split), wanted, limit, source)
    if not questions:
        raise DataError(f"'{spec}' gives no MMLU questions; check the file and the subject filter.")
    n_subj = len(dict.fromkeys(q.subject for q in questions))
    return QuestionSet(tuple(questions), source, f"{len(questions)} questions over {n_subj} subjects "
                                                 f"from {source}")


def load_dev(spec: str, *, subjects: str | Sequence[str] | None = None) -> QuestionSet:
    """Few-shot examples for ``spec``: the hub dataset's ``dev`` split, or a given dev file.

    The bundled package ships only the MMLU test set, so for ``default``/``full`` the pool is the full
    bundled test set; :func:`layerlens.mmlu` never uses a question as its own example (the harness's rule
    when examples come from the evaluated split), so shots are the first k *other* questions of a subject.
    """
    if spec in ("default", "full"):
        return load_questions("full", subjects=subjects)
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_file(spec):
        return load_questions(spec, subjects=subjects)
    name, config, _ = _parse_hub(spec)
    return load_questions(f"{name}:{config or ''}:dev", subjects=subjects, split="dev")
