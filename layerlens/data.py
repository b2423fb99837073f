"""Calibration / evaluation text: load from many sources, tokenize per text, batch with padding."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import defaults
from .errors import DataError, LayerLensError

MIN_CHARS = 1


@dataclass(frozen=True)
class TextSet:
    """Texts plus where they came from (shown in the UI and recorded in provenance)."""

    texts: tuple[str, ...]
    source: str
    description: str

    def head(self, n: int | None) -> TextSet:
        if n is None:
            return self
        return TextSet(self.texts[:n], self.source, self.description)


def read_utf8(path: Path) -> str:
    """A text file's contents, refusing binary and non-UTF-8 files with a clear message (BOM dropped)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise DataError(f"'{path}' looks like a binary file; give a UTF-8 text, .jsonl, .csv or .parquet file.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8.") from exc


def read_json(path: Path) -> Any:
    """A UTF-8 JSON file's contents; invalid JSON is refused naming the line."""
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}' is not valid JSON ({exc.msg}, line {exc.lineno}).") from exc


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _texts_from_records(records: list[dict[str, Any]], path: str, field: str) -> list[str]:
    if records and field not in records[0]:
        cols = ", ".join(list(records[0])[:8])
        raise DataError(f"'{path}' has no '{field}' field (found: {cols}); rename the text column to '{field}'.")
    return [str(r[field]) for r in records if r.get(field) not in (None, "")]


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ""):
        return split_paragraphs(read_utf8(path))
    if suffix == ".jsonl":
        lines = [ln for ln in read_utf8(path).splitlines() if ln.strip()]
        try:
            records = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError as exc:
            raise DataError(f"'{path}' line {exc.lineno} is not valid JSON; fix or remove it.") from exc
        return _texts_from_records(records, str(path), field)
    if suffix == ".json":
        obj = read_json(path)
        if isinstance(obj, dict):
            obj = obj.get("data", obj.get("texts", [obj]))
        if not isinstance(obj, list) or not all(isinstance(x, (str, dict)) for x in obj):
            raise DataError(f"'{path}' must hold a list of strings or of objects with a '{field}' field.")
        if obj and isinstance(obj[0], str):
            return [s for s in obj if isinstance(s, str) and s]
        return _texts_from_records([r for r in obj if isinstance(r, dict)], str(path), field)
    if suffix == ".csv":
        reader = csv.DictReader(read_utf8(path).splitlines())
        return _texts_from_records(list(reader), str(path), field)
    if suffix == ".parquet":
        import pandas as pd  # heavy (~0.3 s): only for .parquet files, not at import

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise DataError(f"'{path}' could not be read as Parquet ({type(exc).__name__}).") from exc
        if field not in frame.columns:
            raise DataError(f"'{path}' has no '{field}' column (found: {', '.join(map(str, frame.columns[:8]))}).")
        return [str(t) for t in frame[field].dropna() if str(t)]
    raise DataError(f"Unsupported data file type '{suffix}'; use .txt, .jsonl, .json, .csv or .parquet.")


def _read_hub(spec: str, field: str) -> list[str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets  # heavy: only for hub datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many network/file errors
        raise DataError(f"Could not load hub dataset '{spec}' ({type(exc).__name__}); the hub may be "
                        "unreachable (offline?): save it locally and pass the file instead.") from exc
    if field not in ds.column_names:
        raise DataError(f"Hub dataset '{spec}' has no '{field}' column (found: {', '.join(ds.column_names)}).")
    return [t for t in ds[field] if t]


def load_texts(spec: str = "default", *, role: str = "calibration", field: str = "text") -> TextSet:
    """Texts from ``default`` (bundled Shakespeare), ``prose`` (stdlib docs), a file, or ``hub:name[:cfg][:split]``.

    A hub dataset is also recognised as ``name[:config][:split]`` when no such local path exists.
    """
    if spec in ("default", "shakespeare"):
        c = defaults.shakespeare_corpus(role)
        return TextSet(c.texts, f"default:{role}", c.description)
    if spec == "prose":
        c = defaults.prose_corpus()
        return TextSet(c.texts, "prose", c.description)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            raise DataError(f"'{spec}' is a folder; pass a .txt, .jsonl, .json, .csv or .parquet file.")
        texts = _read_file(path, field)
        source = str(path)
    else:
        hub = spec.removeprefix("hub:")
        if spec.startswith((".", "/", "~")) or Path(hub.split(":")[0]).suffix in (".txt", ".jsonl", ".csv",
                                                                                  ".json", ".parquet"):
            raise DataError(f"Data file '{spec}' does not exist; check the path.")
        texts = _read_hub(hub, field)
        source = f"hub:{hub}"
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"'{spec}' contains no text; give a file with at least one non-empty text.")
    return TextSet(tuple(texts), source, f"{len(texts)} texts from {source}")


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def check_seq_len(seq_len: int, limit: int | None) -> None:
    if seq_len < 2:
        raise LayerLensError(f"`seq_len` must be at least 2 (got {seq_len}).")
    if limit is not None and seq_len > limit:
        raise LayerLensError(f"`seq_len={seq_len}` is above the model's limit of {limit} positions; "
                             f"use `seq_len={limit}` or less.")


def tokenize_texts(tokenizer: Any, texts: tuple[str, ...] | list[str], seq_len: int) -> list[list[int]]:
    """Each text on its own, with the tokenizer's defaults (special tokens), truncated to ``seq_len``."""
    out = []
    for t in texts:
        ids = tokenizer(t, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) > 0:
            out.append(list(ids))
    return out


def pad_id(tokenizer: Any) -> int:
    """A token id to fill padded positions with that the model's embedding surely has: the pad id, else the
    eos id, when it lies in the tokenizer's base vocabulary, else 0. A pad token ADDED to a tokenizer without
    resizing the model (some ``AutoTokenizer`` classes do it) has an id past the embedding matrix, and
    padded positions are masked anyway, so which valid id fills them does not change any number."""
    base = getattr(tokenizer, "vocab_size", None)
    for tok_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tok_id, int) and tok_id >= 0 and (not isinstance(base, int) or tok_id < base):
            return tok_id
    return 0


def batches(tokenizer: Any, token_lists: list[list[int]], batch_size: int,
            device: str | torch.device = "cpu") -> Iterator[Batch]:
    """Right-padded batches; padding positions have attention_mask 0 and are ignored by every statistic."""
    if batch_size < 1:
        raise LayerLensError(f"`batch_size` must be at least 1 (got {batch_size}).")
    pad = pad_id(tokenizer)
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start:start + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, toks in enumerate(chunk):
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = 1
        yield Batch(ids.to(device), mask.to(device))


def calibration_tokens(tokenizer: Any, texts: TextSet, samples: int, seq_len: int,
                       min_tokens: int = 2) -> list[list[int]]:
    """The first ``samples`` texts as token lists, refusing empty or too-short data with a clear message."""
    if samples < 1:
        raise DataError(f"`samples` must be at least 1 (got {samples}).")
    toks = [t for t in tokenize_texts(tokenizer, texts.texts[:samples], seq_len) if len(t) >= min_tokens]
    if not toks:
        raise DataError(f"The data '{texts.source}' gives no text of at least {min_tokens} tokens; "
                        "use longer texts.")
    return toks
