"""Out-of-core surgery: write a pruned (or merged) model shard by shard, never holding more than a few tensors.

:func:`export_pruned` reads the source checkpoint's tensor table (no weights) and writes safetensors shards
whose headers are known in advance (a merged tensor has its base's shape and dtype), so every tensor is
streamed into place: tensors outside the decoder layers and those of kept layers are copied byte for byte
(kept layers under their new, renumbered keys), a merged layer's attention/MLP tensors are computed one at
a time with :func:`layerlens.surgery.merge_tensors` from the group's tensors, its other tensors (norms) are
the base's. The config is patched by :func:`layerlens.surgery.config_changes` (layer count, every per-layer
list reindexed), as :func:`~layerlens.surgery.apply_plan` does, and the folder also holds the tokenizer,
the generation config and :data:`~layerlens.plans.PLAN_FILE`. The weights keep the checkpoint's dtype.

Dropped sublayers (``plan.drop_attn``/``drop_mlp``) are written as :func:`layerlens.export.save_pruned`
writes them: the full layer with the sublayer's output projection (weight and bias) set to zeros, streamed
without reading the source tensor, so the folder equals ``save_pruned`` of :func:`~layerlens.surgery.apply_plan`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError
from .layerwise import LayerwiseModel, _check_plan
from .plans import PLAN_FILE
from .runs import atomic_dir, atomic_write_json
from .surgery import _is_norm, config_changes, merge_tensors

DEFAULT_SHARD_BYTES = 2 << 30

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _merged_names(lw: LayerwiseModel) -> set[str]:
    """Parameter names (relative to a layer) that a merge combines: :func:`surgery.merged_layer`'s rule."""
    from .adapters import mergeable_parts

    names = set()
    base = lw.templates[0]
    for path, part in zip(lw._part_paths(), mergeable_parts(lw.model, base), strict=True):
        for sub_name, sub in part.named_modules():
            if _is_norm(sub):
                continue
            for pname, p in sub._parameters.items():
                if p is not None:
                    names.add(".".join(x for x in (path, sub_name, pname) if x))
    return names


def _layer_prefix(lw: LayerwiseModel) -> str:
    """How the checkpoint spells the decoder layer list (``model.layers``, ``transformer.h``, ``h``)."""
    name = next(n for n, _ in lw.templates[0].named_parameters())
    key = lw._key_of[f"{lw.adapter.layers}.0.{name}"]
    return key[: -len(f".0.{name}")]


ZEROS = ("zeros",)  # the source of a dropped sublayer's output projection: written as zeros, never read


def _zeroed_prefixes(lw: LayerwiseModel, plan: Any) -> dict[int, list[str]]:
    """Per original layer, the parameter-name prefixes (``self_attn.o_proj.``) that the export zeroes."""
    out: dict[int, list[str]] = {}
    for drops, path, what in ((getattr(plan, "drop_attn", ()), lw.adapter.attn_out, "attention"),
                              (getattr(plan, "drop_mlp", ()), lw.adapter.mlp_out, "MLP")):
        if drops and not path:
            raise PlanError(f"Model type '{lw.config.model_type}' has no known {what} output projection to "
                            "zero, so a model with dropped sublayers cannot be saved for plain transformers.")
        for o in drops:
            out.setdefault(o, []).append(path + ".")
    return out


_ST_NAMES = {t: name for name, t in _TORCH_DTYPES.items()}  # torch dtype -> safetensors' name


def _is_float(st_name: str) -> bool:
    return _TORCH_DTYPES.get(st_name, torch.int8).is_floating_point


def output_tensors(lw: LayerwiseModel, plan: Any, dtype: str | None = None) -> list[tuple[str, dict[str, Any], Any]]:
    """``(new key, {dtype, shape}, source)`` for every tensor of the pruned checkpoint, in source order.

    ``source`` is a checkpoint key (copied as is), ``(formula, [keys])`` (merged), :data:`ZEROS`, or
    ``("cast", key)`` when ``dtype`` (a name; None: the checkpoint's) differs from a floating tensor's."""
    items = _output_tensors(lw, plan)
    if dtype is None:
        return items
    from .loading import DTYPES

    name = _ST_NAMES[DTYPES[dtype]]
    out = []
    for key, info, source in items:
        if _is_float(info["dtype"]) and info["dtype"] != name:
            info = dict(info, dtype=name)
            source = ("cast", source) if isinstance(source, str) else source  # merged / zeros: made in it
        out.append((key, info, source))
    return out


def _output_tensors(lw: LayerwiseModel, plan: Any) -> list[tuple[str, dict[str, Any], Any]]:
    _check_plan(plan, lw.num_layers, export=True)
    ckpt = lw.checkpoint
    prefix = _layer_prefix(lw)
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")
    by_layer: dict[int, list[tuple[str, str]]] = {}
    outside = []
    for key in ckpt.meta:
        m = pattern.fullmatch(key)
        if m is None:
            outside.append(key)
        else:
            by_layer.setdefault(int(m.group(1)), []).append((m.group(2), key))
    merged = _merged_names(lw) if plan.merge else set()
    bases = plan.merge_bases
    zeroed = _zeroed_prefixes(lw, plan)
    out: list[tuple[str, dict[str, Any], Any]] = []
    for key in outside:
        out.append((key, ckpt.meta[key], key))
    for j, o in enumerate(plan.kept_layers):
        for rest, key in by_layer.get(o, []):
            new = f"{prefix}.{j}.{rest}"
            if any(rest.startswith(z) for z in zeroed.get(o, ())):
                out.append((new, ckpt.meta[key], ZEROS))
            elif o in bases and rest in merged:
                group = [f"{prefix}.{i}.{rest}" for i in bases[o]]
                out.append((new, ckpt.meta[key], (plan.merge_formula, group)))
            else:
                out.append((new, ckpt.meta[key], key))
    return out


def _write_shard(lw: LayerwiseModel, path: Path, items: list[tuple[str, dict[str, Any], Any]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, info, _source in items:
        size = _nbytes(info)
        header[key] = {"dtype": info["dtype"], "shape": list(info["shape"]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _key, _info, source in items:
            if isinstance(source, str):
                lw.checkpoint.copy_bytes(source, f)
            elif source == ZEROS:
                _write_zeros(f, _nbytes(_info))
            else:
                if source[0] == "cast":
                    t = lw.checkpoint.read([source[1]])[source[1]]
                else:
                    formula, keys = source
                    read = lw.checkpoint.read(keys)  # merged in the compute dtype, as in memory, then cast
                    t = merge_tensors([read[k].to(lw.dtype) for k in keys], formula)
                    del read
                t = t.to(_TORCH_DTYPES[_info["dtype"]])
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _stored_dtype(lw: LayerwiseModel) -> str | None:
    """The dtype most of the checkpoint's floating tensors are stored in, by name (None: no float tensor)."""
    from collections import Counter

    counts = Counter(info["dtype"] for info in lw.checkpoint.meta.values() if _is_float(info["dtype"]))
    if not counts:
        return None
    return str(_TORCH_DTYPES[counts.most_common(1)[0][0]]).removeprefix("torch.")


def _write_zeros(f: Any, size: int, chunk: int = 64 << 20) -> None:
    block = bytes(min(chunk, size))  # zero bytes are the value 0 in every float and integer dtype
    while size > 0:
        f.write(block[:min(chunk, size)])
        size -= chunk


def _nbytes(info: Mapping[str, Any]) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n * torch.empty((), dtype=_TORCH_DTYPES[info["dtype"]]).element_size()


def write_pruned_weights(lw: LayerwiseModel, plan: Any, folder: Path,
                         max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None) -> dict[str, Any]:
    """The pruned model's safetensors shards (and index) in ``folder``; returns the config it needs."""
    items = output_tensors(lw, plan, dtype)
    shards: list[list[tuple[str, dict[str, Any], Any]]] = [[]]
    size = 0
    for item in items:
        n = _nbytes(item[1])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    if len(shards) == 1:
        _write_shard(lw, folder / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(lw, folder / name, shard)
            weight_map.update({key: name for key, _, _ in shard})
        total = sum(_nbytes(info) for _, info, _ in items)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return pruned_config(lw, plan)


def pruned_config(lw: LayerwiseModel, plan: Any) -> Any:
    """The source config with :func:`surgery.config_changes` applied (as :func:`surgery.apply_plan` does)."""
    config = copy.deepcopy(lw.config)
    changes = config_changes(config, lw.adapter, plan.kept_layers, plan.num_layers)
    targets = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        targets.append(text)
    for c in targets:
        for k, v in changes.items():
            if hasattr(c, k):
                setattr(c, k, v)
    return config


def export_pruned(lw: LayerwiseModel, plan: Any, folder: str | Path, *, report: Any = None,
                  meta: Mapping[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  dtype: str | None = None) -> dict[str, Any]:
    """Save the model pruned by ``plan`` like :func:`layerlens.export.save_pruned`, tensor by tensor.

    ``dtype`` (a name; None: each tensor's checkpoint dtype) is the dtype floating weights are written in.
    Returns the :data:`PLAN_FILE` record. The folder is written in a temp folder and renamed (atomic).
    """
    from .export import plan_record

    written = dtype or _stored_dtype(lw)
    record = plan_record(plan, report=report, meta=dict(meta or {}) | {"execution": "layerwise"})
    record["meta"]["export_dtype"] = written
    start = lw.checkpoint.bytes_read
    with atomic_dir(folder) as tmp:
        config = write_pruned_weights(lw, plan, tmp, max_shard_bytes, dtype)
        if written is not None:
            config.dtype = written  # what the files hold (the open model's config says its compute dtype)
        config.save_pretrained(tmp)
        gen = lw.source / "generation_config.json"
        if gen.exists():
            (tmp / gen.name).write_bytes(gen.read_bytes())
        lw.tokenizer.save_pretrained(tmp)
        record["meta"]["layerwise"] = {"bytes_read": lw.checkpoint.bytes_read - start}
        atomic_write_json(tmp / PLAN_FILE, record)
    return record
