"""Layer-by-layer (out-of-core) execution: models larger than memory, one decoder layer's weights at a time.

:class:`LayerwiseModel` opens a local safetensors model folder (one file, or shards with
``model.safetensors.index.json``) without loading its weights: the model is built on the meta device
(accelerate's ``init_empty_weights``; buffers such as rotary tables stay real), and its decoder layers are
replaced by *stubs*. Running the model's own backbone forward over the stubs gives, for every batch, the
embedding output h_0 and the exact arguments the model's forward passes to each layer (causal/padding
mask, per-layer-type masks, rotary ``position_embeddings``, ``position_ids``): masks, positions and
padding are therefore built by the model's own code, exactly as in a normal forward. Then, for each
decoder layer in order, only that layer's tensors are read (``safe_open``, its keys only), the layer is
materialised, every batch's hidden states go through it (with that layer's recorded arguments), the
metrics are updated, and the layer is freed. Hidden states between layers stay on the device when they fit
in half its free memory, else in CPU memory.

Metrics (:meth:`LayerwiseModel.analyze`), equal to :func:`layerlens.metrics.analyze`:

* BI, magnitude: adjacent states only, accumulated while layer i runs (its input and output are at hand).
* cosine matrix, (L+1)^2: needs every pair of states of a token. Each state's unit-normalised kept tokens
  are spilled to a memory-mapped file (float16 by default: its rounding moves a cosine by < 1e-5 here,
  float32 on request), state-major; at the end, token chunks of all states are read back once and
  multiplied (one write and one read of ``(L+1) x tokens x hidden x 2`` bytes).
* minibatch CKA, (L+1)^2: per calibration sample, each state's n x n Gram matrix of its kept tokens
  (float32, as in memory) is spilled too (``(L+1) x sum(n_i^2) x 4`` bytes); at the end each sample's
  (L+1) Grams are read back together and give the same unbiased HSIC sums. The exact feature-space
  estimator needs all pairs of states at once in memory and is refused in this mode.

Evaluation (:meth:`LayerwiseModel.evaluate`): the batches of any perplexity/MMLU task go through the layers
a plan keeps (removed layers are never read; a merged layer is built tensor by tensor with
:func:`layerlens.surgery.merge_tensors`); many plans run together, sharing the states of common prefixes
exactly as :mod:`layerlens.prefix_reuse` defines them (:func:`~layerlens.prefix_reuse.state_key`), so a
sweep reads each layer once. The final norm and the LM head then give each batch's logits, fed to the
task's own scoring (:meth:`PerplexityTask.run` / :meth:`MMLUTask.run`).

Export (:func:`layerlens.layerwise_export.export_pruned`) writes a pruned model tensor by tensor.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .adapters import ArchAdapter, adapter_for, get_attr, mergeable_parts, num_layers_of, set_attr
from .capture import _first_tensor
from .errors import LayerLensError, PlanError, ResourceError
from .evaluation import EvalBatch
from .loading import (
    ModelInfo,
    _load_config,
    dtype_name,
    max_positions,
    resolve_device,
    resolve_dtype,
    resolve_source,
)

Progress = Callable[[int, int, str], None]

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_size(text: str | int | float | None) -> int | None:
    """``"1GB"``, ``"512MB"``, ``"1.5GiB"``, ``"800M"`` or a byte count -> bytes (binary units: 1GB = 2^30)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.fullmatch(str(text))
    if m is None or float(m.group(1)) <= 0:
        raise LayerLensError(f"`max_memory` must be a size like 1GB or 512MB (got '{text}').")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# --------------------------------------------------------------------------------------------------------
# The checkpoint: which file holds which tensor, read one layer's keys at a time
# --------------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


class Checkpoint:
    """The safetensors files of a model folder; :meth:`read` returns tensors of the named keys only."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise LayerLensError(f"Layer-wise mode reads safetensors weights, and '{folder}' has none "
                                 "(model.safetensors or model.safetensors.index.json); re-save the model "
                                 "with save_pretrained() (safetensors is its default).")
        self.files = files
        self.headers: dict[str, dict[str, Any]] = {}
        self.data_start: dict[str, int] = {}
        for f in files:
            self.headers[f], self.data_start[f] = _read_header(self.folder / f)
        self.where: dict[str, str] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        for f, header in self.headers.items():
            for key, info in header.items():
                if key != "__metadata__":
                    self.where[key] = f
                    self.meta[key] = info
        self.bytes_read = 0

    def nbytes(self, key: str) -> int:
        begin, end = self.meta[key]["data_offsets"]
        return end - begin

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.meta)

    def numel(self, key: str) -> int:
        return math.prod(self.meta[key]["shape"])

    def copy_bytes(self, key: str, out: Any, chunk: int = 64 << 20) -> None:
        """Write tensor ``key``'s raw bytes to the open file ``out`` (in chunks: never the whole tensor)."""
        f = self.where[key]
        begin, end = self.meta[key]["data_offsets"]
        with open(self.folder / f, "rb") as src:
            src.seek(self.data_start[f] + begin)
            left = end - begin
            while left > 0:
                block = src.read(min(chunk, left))
                out.write(block)
                left -= len(block)
        self.bytes_read += end - begin

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` (CPU, file dtype), opening each file once (``safe_open``, its keys only)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for f, ks in by_file.items():
            with safe_open(str(self.folder / f), framework="pt", device="cpu") as handle:
                for k in ks:
                    out[k] = handle.get_tensor(k)  # backed by the file's pages until cast or moved
                    self.bytes_read += self.nbytes(k)
        return out


# --------------------------------------------------------------------------------------------------------
# Stubs: the model's own forward builds every layer's arguments
# --------------------------------------------------------------------------------------------------------


class _Stub(nn.Module):
    """Stands in for decoder layer ``index``: records the arguments it is called with, returns its input."""

    def __init__(self, index: int, template: nn.Module, sink: Callable[[int, torch.Tensor, tuple, dict], None]):
        super().__init__()
        for k, v in template.__dict__.items():  # attention_type, layer_idx, ... (read by some forwards)
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None))):
                self.__dict__[k] = v
        self.index = index
        self._sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink(self.index, hidden_states, args, kwargs)
        return hidden_states


@dataclass
class _Prepared:
    """One batch after the embeddings: h_0 and each layer's recorded call arguments."""

    h0: torch.Tensor
    calls: list[tuple[tuple, dict]]
    mask: torch.Tensor | None = None


@dataclass
class ExecutionStats:
    """What the last layer-wise run cost (for provenance and benchmarks)."""

    bytes_read: int = 0
    layers_loaded: int = 0
    state_device: str = "cpu"
    state_bytes: int = 0
    spill_bytes: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_read": self.bytes_read, "layers_loaded": self.layers_loaded,
                "state_device": self.state_device, "state_bytes": self.state_bytes,
                "spill_bytes": self.spill_bytes, "seconds": round(self.seconds, 3), **self.extra}


def _meta_like(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def weights_bytes(folder: str | Path, dtype: torch.dtype | None = None) -> int:
    """Bytes the model's weights take in memory (in ``dtype``; None: as stored)."""
    ckpt = Checkpoint(Path(folder))
    if dtype is None:
        return ckpt.total_bytes
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8
    return sum(ckpt.numel(k) * (elem if ckpt.meta[k]["dtype"].startswith(("F", "BF")) else
                                _ST_DTYPES.get(ckpt.meta[k]["dtype"], 4)) for k in ckpt.meta)


class LayerwiseModel:
    """A causal LM opened without its weights; layers are read from disk one at a time (module docstring).

    Has ``info`` and ``tokenizer`` like :class:`layerlens.loading.LoadedModel`, so the faces can hold either.
    """

    layerwise = True

    def __init__(self, spec: str = "default", *, revision: str | None = None, dtype: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, work_dir: str | Path | None = None,
                 spill_dtype: torch.dtype = torch.float16, states: str = "auto"):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        source = resolve_source(spec)
        if isinstance(source, str):
            source = _hub_folder(source, revision)
        self.spec, self.source, self.revision = spec, Path(source), revision
        self.device = torch.device(resolve_device(device))
        self.dtype = resolve_dtype(dtype, str(self.device))
        self.config = _load_config(self.source, revision, trust_remote_code)
        if getattr(self.config, "is_encoder_decoder", False):
            raise LayerLensError(f"'{spec}' is not a decoder-only causal LM; LayerLens analyses causal LMs.")
        num_layers_of(self.config)
        self.checkpoint = Checkpoint(self.source)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                     trust_remote_code=trust_remote_code)
        model.eval()
        self.model = model
        self.adapter: ArchAdapter = adapter_for(model)
        self.templates: list[nn.Module] = list(get_attr(model, self.adapter.layers))  # type: ignore[arg-type]
        self.num_layers = len(self.templates)
        self._record: dict[int, tuple[torch.Tensor, tuple, dict]] = {}
        stubs = nn.ModuleList([_Stub(i, t, self._sink) for i, t in enumerate(self.templates)])
        set_attr(model, self.adapter.layers, stubs)
        for m in model.modules():  # buffers (rotary tables) to the device; parameters stay on meta
            for k, b in m._buffers.items():
                if b is not None and b.device.type != "meta":
                    m._buffers[k] = b.to(self.device)
        self.backbone = getattr(model, "base_model", model)
        self._key_of = self._key_map()
        self.input_embeddings = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.spill_dtype = spill_dtype
        if states not in ("auto", "device", "cpu", "disk"):
            raise LayerLensError(f"`states` must be auto, device, cpu or disk (got '{states}').")
        self.states = states
        self._disk: Path | None = None  # memory-mapped states (states="disk"): one file per tensor
        self._files: dict[int, Path] = {}
        self.stats = ExecutionStats()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise LayerLensError(f"'{spec}' has no usable tokenizer ({str(exc).splitlines()[0]}); save the "
                                 "tokenizer next to the model.") from exc
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
        params = sum(self.checkpoint.numel(k) for k in self.checkpoint.meta)
        self.info = ModelInfo(
            model=spec, revision=revision, model_type=getattr(self.config, "model_type", "?"),
            architecture=(self.config.architectures or [type(model).__name__])[0], num_layers=self.num_layers,
            hidden_size=self.hidden, num_parameters=params, dtype=dtype_name(self.dtype), device=str(self.device),
            max_positions=max_positions(self.config), source_path=str(self.source))

    # -- weights -----------------------------------------------------------------------------------------
    def _key_map(self) -> dict[str, str]:
        """Model parameter name -> checkpoint key (exact, or with/without the base model prefix)."""
        prefix = getattr(self.model, "base_model_prefix", "")
        renamed = {}  # the checkpoint's legacy names as transformers renames them on load (embed_out -> lm_head)
        for key in self.checkpoint.meta:
            name = key
            for src, tgt in _renamings(self.model):
                name = re.sub(src, tgt, name)
            renamed[name] = key
        out = {}
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        for i, t in enumerate(self.templates):
            names += [f"{self.adapter.layers}.{i}.{n}" for n, _ in t.named_parameters(remove_duplicate=False)]
        for n in names:
            for cand in (n, n.removeprefix(prefix + "."), f"{prefix}.{n}"):
                if cand in renamed:
                    out[n] = renamed[cand]
                    break
        return out

    def _assign(self, root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            parent_path, _, leaf = name.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            parent._parameters[leaf] = nn.Parameter(t.to(device=self.device, dtype=self.dtype),
                                                    requires_grad=False)

    def _load_module(self, module: nn.Module, prefix: str) -> None:
        """Read every parameter of ``module`` (model path ``prefix``) from the checkpoint."""
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        missing = [n for n in names if f"{prefix}{n}" not in self._key_of]
        if missing:
            raise LayerLensError(f"The checkpoint in '{self.source}' has no tensor for '{prefix}{missing[0]}'; "
                                 "the files may be incomplete: re-save the model.")
        keys = {n: self._key_of[f"{prefix}{n}"] for n in names}
        read = self.checkpoint.read(sorted(set(keys.values())))
        self._assign(module, {n: read[k] for n, k in keys.items()})

    @staticmethod
    def _unload(module: nn.Module) -> None:
        for m in module.modules():
            for leaf, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[leaf] = _meta_like(p)

    def _head_prefix(self) -> str:
        for name, mod in self.model.named_modules():
            if mod is self.head:
                return f"{name}."
        raise LayerLensError("The model has no output embeddings (LM head); it is not a causal LM.")

    def _load_head(self) -> None:
        prefix = self._head_prefix()
        names = [n for n, _ in self.head.named_parameters(remove_duplicate=False)]
        emb_prefix = next(f"{n}." for n, m in self.model.named_modules() if m is self.input_embeddings)
        tensors = {}
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        tied = bool(getattr(text, "tie_word_embeddings", False))
        for n in names:
            key = self._key_of.get(f"{prefix}{n}") or (self._key_of.get(f"{emb_prefix}{n}") if tied else None)
            if key is None:
                raise LayerLensError(f"The checkpoint in '{self.source}' has no LM head weights; re-save the model.")
            tensors[n] = self.checkpoint.read([key])[key]
        self._assign(self.head, tensors)

    def _load_rest(self) -> None:
        """Everything outside the decoder layers and the LM head (embeddings, position tables, final norm)."""
        head = self._head_prefix()
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False) if not n.startswith(head)]
        missing = [n for n in names if n not in self._key_of]
        if missing:
            raise LayerLensError(f"The checkpoint in '{self.source}' has no tensor for '{missing[0]}'; "
                                 "the files may be incomplete: re-save the model.")
        read = self.checkpoint.read(sorted({self._key_of[n] for n in names}))
        self._assign(self.model, {n: read[self._key_of[n]] for n in names})

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights read from disk (free it with :meth:`release`)."""
        layer = self.templates[index]
        self._load_module(layer, f"{self.adapter.layers}.{index}.")
        self.stats.layers_loaded += 1
        return layer

    def merged(self, group: tuple[int, ...], formula: str) -> nn.Module:
        """The merged layer of ``group`` (at its base), as :func:`layerlens.surgery.merged_layer` builds it,
        computed tensor by tensor: attention/MLP parameters (norms inside them excepted) merged, the rest the
        base's."""
        from .surgery import _is_norm, merge_tensors

        base = self.templates[group[0]]
        merged_names = set()
        for path, part in zip(self._part_paths(), mergeable_parts(self.model, base), strict=True):
            for sub_name, sub in part.named_modules():
                if _is_norm(sub):
                    continue
                for pname, p in sub._parameters.items():
                    if p is not None:
                        merged_names.add(".".join(x for x in (path, sub_name, pname) if x))
        tensors = {}
        for n, _ in base.named_parameters(remove_duplicate=False):
            if n in merged_names:
                keys = [self._key_of[f"{self.adapter.layers}.{i}.{n}"] for i in group]
                read = self.checkpoint.read(keys)
                tensors[n] = merge_tensors([read[k].to(self.dtype) for k in keys], formula)
            else:
                key = self._key_of[f"{self.adapter.layers}.{group[0]}.{n}"]
                tensors[n] = self.checkpoint.read([key])[key]
        self._assign(base, tensors)
        self.stats.layers_loaded += len(group)
        return base

    def _without_sublayers(self, layer: nn.Module, attn: bool, mlp: bool) -> nn.Module:
        """A clone of ``layer`` whose attention and/or MLP add nothing, as :func:`surgery.apply_plan` makes it."""
        from .surgery import _sublayer_swaps, shallow_clone

        clone = shallow_clone(layer)
        for path, part in _sublayer_swaps(clone, self.adapter, attn, mlp):
            set_attr(clone, path, part)
        return clone

    def _part_paths(self) -> list[str]:
        return [self.adapter.attention, *self.adapter.mlp.split(",")]

    def release(self, layer: nn.Module) -> None:
        self._unload(layer)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        _trim_heap()

    # -- the embeddings pass -----------------------------------------------------------------------------
    def _sink(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self._record[index] = (hidden, args, kwargs)

    def _prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, state_device: torch.device) -> _Prepared:
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(self.device)
        self._record.clear()
        self.backbone(**kwargs)
        if len(self._record) != self.num_layers:
            raise RuntimeError("the model's forward did not call every decoder layer")
        h0 = self._keep(self._record[0][0].detach(), state_device)
        calls = [(self._record[i][1], self._record[i][2]) for i in range(self.num_layers)]
        self._record.clear()
        return _Prepared(h0, calls, attention_mask)

    def _state_device(self, nbytes: int) -> torch.device:
        """Where hidden states live between layers: the device when they fit in half its free memory, else
        CPU memory when they fit in half the free RAM, else memory-mapped files (``work_dir``)."""
        from .loading import available_bytes

        if self.states == "device" or (self.states == "auto" and self.device.type == "cuda"
                                       and nbytes < 0.5 * torch.cuda.mem_get_info(self.device)[0]):
            return self.device
        free = available_bytes("cpu")
        if self.states == "disk" or (self.states == "auto" and free is not None and nbytes > 0.5 * free):
            self._disk = Path(tempfile.mkdtemp(prefix="layerwise-states-", dir=self.work_dir))
            return torch.device("meta")  # marker: _keep writes to a file
        return torch.device("cpu")

    def _keep(self, t: torch.Tensor, where: torch.device) -> torch.Tensor:
        """``t`` stored where states live (a copy: on the device, in CPU memory or in a mapped file)."""
        if where.type != "meta":
            return t.to(where, copy=True)
        path = self._disk / f"{len(self._files)}-{time.monotonic_ns()}.bin"  # type: ignore[operator]
        out = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        out.copy_(t)
        self._files[id(out)] = path
        return out

    def _drop(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            path = self._files.pop(id(t), None)
            if path is not None:
                path.unlink(missing_ok=True)

    def _end_states(self) -> None:
        if self._disk is not None:
            shutil.rmtree(self._disk, ignore_errors=True)
        self._disk, self._files = None, {}

    def _run_layer(self, layer: nn.Module, o: int, h: torch.Tensor, prep: _Prepared) -> torch.Tensor:
        args, kwargs = prep.calls[o]
        out = layer(h.to(self.device), *args, **kwargs)
        return _first_tensor(out).detach()

    def _embed_all(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
                   ) -> list[_Prepared]:
        elem = torch.finfo(self.dtype).bits // 8
        nbytes = sum(ids.numel() for ids, _, _ in inputs) * self.hidden * elem
        state_device = self._state_device(nbytes)
        self._where = state_device
        self.stats.state_device = "disk (memory-mapped)" if state_device.type == "meta" else str(state_device)
        self.stats.state_bytes = nbytes
        self._load_rest()
        try:
            with torch.inference_mode():
                return [self._prepare(ids, mask, pos, state_device) for ids, mask, pos in inputs]
        finally:
            self._unload(self.input_embeddings)  # the head may share it: reloaded for the logits

    # -- analysis ----------------------------------------------------------------------------------------
    def analyze(self, texts: Any, config: Any = None, *, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None, meta: dict[str, Any] | None = None) -> Any:
        """The redundancy report of :func:`layerlens.metrics.analyze`, computed layer by layer (the same
        options: ``skip_first``, sublayers, bootstrap, ``last_state``, ``block_distance``)."""
        from .adapters import mid_residual_path
        from .data import batches, calibration_tokens, check_seq_len
        from .metrics import Cancelled, CaptureConfig, _Accumulators
        from .report import LayerReport
        from .runs import provenance

        config = config or CaptureConfig()
        config.validate()
        if config.cka_estimator != "minibatch":
            raise ResourceError("Layer-wise mode computes minibatch CKA only (exact CKA needs every pair of "
                                "states in memory at once); use `cka_estimator=minibatch`.")
        post_norm = getattr(config, "last_state", "pre-norm") == "post-norm"
        norm = get_attr(self.model, self.adapter.final_norm) if self.adapter.final_norm else None
        if post_norm and norm is None:
            raise LayerLensError("`last_state=post-norm` needs a final norm, and this model has none.")
        mid_path = mid_residual_path(self.model) if getattr(config, "sublayers", False) else None
        check_seq_len(config.seq_len, self.info.max_positions)
        token_lists = calibration_tokens(self.tokenizer, texts, config.samples, config.seq_len)
        started = time.perf_counter()
        self.stats = ExecutionStats()
        bs = list(batches(self.tokenizer, token_lists, config.batch_size, "cpu"))
        preps = self._embed_all([(b.input_ids, b.attention_mask, None) for b in bs])
        skip = config.skip_first
        masks = [b.attention_mask[:, skip:].bool() for b in bs]
        work = Path(tempfile.mkdtemp(prefix="layerwise-", dir=self.work_dir))
        try:
            acc = _SpillAccumulators(self.num_layers + 1, self.hidden, masks, work, self.spill_dtype,
                                     sublayers=mid_path is not None)
            states = [p.h0 for p in preps]
            with torch.inference_mode():
                for b, h in enumerate(states):
                    acc.add_state(0, b, h[:, skip:])
                total = self.num_layers
                for o in range(self.num_layers):
                    if should_stop is not None and should_stop():
                        raise Cancelled("Analysis cancelled; nothing was saved. Press Analyze to start again.")
                    layer = self.layer(o)
                    mids: list[torch.Tensor] = []
                    handle = None if mid_path is None else get_attr(layer, mid_path).register_forward_pre_hook(
                        lambda _m, a, k, mids=mids: mids.append(k["hidden_states"] if "hidden_states" in k else a[0]),
                        with_kwargs=True)
                    try:
                        for b, prep in enumerate(preps):
                            mids.clear()
                            out = self._run_layer(layer, o, states[b], prep)
                            if mid_path is not None:
                                acc.add_sublayers(o, b, states[b][:, skip:].to(out.device),
                                                  mids[0].reshape(out.shape)[:, skip:], out[:, skip:])
                            shown = norm(out) if post_norm and o == self.num_layers - 1 else out
                            acc.add_state(o + 1, b, shown[:, skip:], prev=states[b][:, skip:].to(out.device))
                            self._drop([states[b]])
                            states[b] = self._keep(out, self._where)
                    finally:
                        if handle is not None:
                            handle.remove()
                        self.release(layer)
                    acc.unmap_pages()
                    if progress is not None:
                        progress(o + 1, total, f"layer {o + 1}/{total}")
                del states, preps
                fields = acc.finish(getattr(config, "block_distance", "all-tokens"))
            self.stats.spill_bytes = acc.spill_bytes
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self._end_states()
        info = dict(meta or {})
        resamples = getattr(config, "bootstrap", 0)
        if resamples:  # the in-memory bootstrap, fed the same per-sample sums
            boot = _Accumulators(self.num_layers + 1, self.hidden, "minibatch", torch.device("cpu"))
            boot.sample_cos, boot.sample_tokens = [acc.sample_cos], [acc.sample_tokens]
            boot.sample_sub = [acc.sample_sub] if mid_path is not None else []
            rank_k = min(config.rank_k or max(1, round(self.num_layers / 4)), self.num_layers)
            fields.update(boot.confidence(resamples, config.ci_level, rank_k, config.seed))
            info["bootstrap"] = {"resamples": resamples, "level": config.ci_level, "rank_k": rank_k,
                                 "seed": config.seed, "unit": "calibration sample"}
        elif hasattr(config, "bootstrap"):
            info["bootstrap"] = None
        if hasattr(config, "sublayers"):
            from .metrics import sublayer_note

            info.update(sublayers=sublayer_note(self.model) if config.sublayers else "off",
                        last_state=config.last_state, block_distance=config.block_distance)
        self.stats.bytes_read = self.checkpoint.bytes_read
        self.stats.seconds = time.perf_counter() - started
        info.update(data=texts.source, data_description=texts.description, samples=len(token_lists),
                    seq_len=config.seq_len, batch_size=config.batch_size, tokens=acc.tokens, seed=config.seed,
                    cka_minibatches=acc.cka_minibatches, skip_first=config.skip_first,
                    seconds=round(self.stats.seconds, 3))
        info.setdefault("dtype", dtype_name(self.dtype))
        info.setdefault("device", str(self.device))
        info["execution"] = "layerwise"
        info["layerwise"] = self.stats.to_dict()
        return LayerReport(cka_estimator="minibatch", meta=provenance(**info), **fields)

    # -- evaluation --------------------------------------------------------------------------------------
    def final_states(self, batches: Sequence[EvalBatch], plans: Sequence[Any], *,
                     progress: Progress | None = None, total_units: int | None = None) -> list[list[torch.Tensor]]:
        """The last hidden state (before the final norm) of every batch under every plan, layer by layer.

        Plans share the states of common prefixes (:func:`layerlens.prefix_reuse.state_key`): each
        (prefix, layer) is computed once, and each original layer is read once for all plans that keep it
        (a merged layer once per distinct merge). ``progress(done, total, label)`` counts layer runs (one
        layer over every batch for one distinct prefix: :func:`pass_units`), so its rate gives the time left;
        ``total_units`` makes room for the caller's later steps (:meth:`evaluate` adds the LM heads).
        """
        for plan in plans:
            _check_plan(plan, self.num_layers)
        preps = self._embed_all([(b.input_ids, b.attention_mask, b.position_ids) for b in batches])
        schedule, where = pass_schedule(plans, self.num_layers)
        units = pass_units(schedule) if total_units is None else total_units
        done = 0
        states: dict[tuple, list[torch.Tensor]] = {(): [p.h0 for p in preps]}
        peak = 1
        with torch.inference_mode():
            for o, (todo, live) in enumerate(schedule):
                new_states: dict[tuple, list[torch.Tensor]] = {}
                plain: nn.Module | None = None  # layer o as stored: read once for every op that is not a merge
                try:
                    for op, keys in sorted(todo.items(), key=lambda kv: str(kv[0])):
                        merge = isinstance(op, tuple) and op[0] == 2
                        if merge:
                            layer = self.merged(tuple(range(o, o + op[1])), op[2])
                        else:
                            plain = plain if plain is not None else self.layer(o)
                            layer = plain
                        try:
                            run = self._without_sublayers(layer, bool(op[1]), bool(op[2])) \
                                if isinstance(op, tuple) and op[0] == 3 else layer  # a clone sharing weights
                            for key in keys:
                                new_states[key + ((o, op),)] = [
                                    self._keep(self._run_layer(run, o, h, prep), self._where)
                                    for h, prep in zip(states[key], preps, strict=True)]
                        finally:
                            run = None
                            if merge:
                                self.release(layer)
                        done += len(keys)
                finally:
                    if plain is not None:
                        self.release(plain)
                states.update(new_states)
                peak = max(peak, len(states))
                for key in list(states):
                    if key not in live:
                        self._drop(states.pop(key))
                if progress is not None:
                    progress(done, units, f"layer {o + 1}/{self.num_layers}")
        self.stats.extra["peak_states"] = peak
        return [states[w] for w in where]

    def head_units(self) -> int:
        """The LM head's work per token in decoder layers (its parameters over a layer's; at least 1)."""
        head = sum(p.numel() for p in self.head.parameters())
        layers = per_layer_params(self)
        return max(1, round(head / max(1, sum(layers) / max(1, len(layers)))))

    def logits(self, hidden: torch.Tensor, batch: EvalBatch) -> torch.Tensor:
        """The LM head's float32 logits from a last hidden state (final norm applied), at ``batch.keep``."""
        norm = get_attr(self.model, self.adapter.final_norm) if self.adapter.final_norm else None
        with torch.inference_mode():
            x = hidden.to(self.device)
            if norm is not None:
                x = norm(x)
            if batch.keep is not None:
                x = x[:, batch.keep.to(self.device)]
            logits = self.head(x)
            cap = getattr(self.config.get_text_config() if hasattr(self.config, "get_text_config")
                          else self.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def evaluate(self, tasks: Sequence[Any], plans: Sequence[Any], *,
                 progress: Progress | None = None) -> list[list[Any]]:
        """``results[t][p]``: task ``t`` (a PerplexityTask / MMLUTask) scored on the model pruned by plan ``p``.

        One pass over the weights for every task and plan together. A perplexity task made with ``kl=True``
        also gets its reference (the unpruned model's last states through the final norm, what
        :meth:`PerplexityTask.keep_reference` keeps), computed in the same pass: KL and top-1 agreement.
        """
        from .plans import PrunePlan

        started = time.perf_counter()
        self.stats = ExecutionStats()
        spans, all_batches = [], []
        for task in tasks:
            spans.append((len(all_batches), len(all_batches) + len(task.batches)))
            all_batches.extend(task.batches)
        run_plans = list(plans)
        original = None
        if any(getattr(t, "kl", False) for t in tasks):
            original = next((i for i, p in enumerate(plans) if _unchanged(p)), None)
            if original is None:
                run_plans.append(PrunePlan(self.num_layers, "remove"))
                original = len(run_plans) - 1
        layer_units = pass_units(pass_schedule(run_plans, self.num_layers)[0])
        head = self.head_units()  # one plan's scoring through the LM head, in layer runs
        total = layer_units + head * (len(plans) * len(tasks) + (original is not None))
        try:
            finals = self.final_states(all_batches, run_plans, progress=progress, total_units=total)
            self._load_head()
            done = layer_units
            if original is not None:
                self._keep_references(tasks, spans, finals[original])
                done += head
            results = []
            for t, task in enumerate(tasks):
                lo, _ = spans[t]
                row = []
                for p in range(len(plans)):
                    row.append(task.run(lambda i, batch, p=p, lo=lo: self.logits(finals[p][lo + i], batch)))
                    done += head
                    if progress is not None:
                        progress(done, total, f"scoring {p + 1}/{len(plans)} through the LM head")
                results.append(row)
        finally:
            self._unload(self.head)
            self._end_states()
        self.stats.bytes_read = self.checkpoint.bytes_read
        self.stats.seconds = time.perf_counter() - started
        return results

    def _keep_references(self, tasks: Sequence[Any], spans: list[tuple[int, int]],
                         finals: list[torch.Tensor]) -> None:
        from .evaluation import Reference

        norm = get_attr(self.model, self.adapter.final_norm) if self.adapter.final_norm else None
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for task, (lo, hi) in zip(tasks, spans, strict=True):
            if not getattr(task, "kl", False):
                continue
            with torch.inference_mode():
                inputs = tuple((norm(h.to(self.device)) if norm is not None else h).to("cpu", copy=True)
                               for h in finals[lo:hi])
            task.reference = Reference(inputs, self.head, getattr(text, "final_logit_softcapping", None))

    def harness_max_length(self) -> int:
        from .evaluation import harness_max_length

        return harness_max_length(self.model, self.tokenizer)


def _unchanged(plan: Any) -> bool:
    return not plan.removed_layers and not plan.merge and not getattr(plan, "drop_attn", ()) \
        and not getattr(plan, "drop_mlp", ())


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    """(pattern, replacement) of transformers' plain key renamings for this model (legacy checkpoint names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # another transformers: names are used as they are
        return []
    out = []
    for t in get_model_conversion_mapping(model, add_legacy=False) or []:
        if type(t) is WeightRenaming:
            out += list(zip(t.source_patterns, t.target_patterns, strict=False))
    return out


def pass_schedule(plans: Sequence[Any], num_layers: int) -> tuple[list[tuple[dict[Any, list[tuple]], set]], list]:
    """What one layer-wise pass over ``plans`` computes: per original layer, ``({op: [state keys]}, live keys
    after it)``, and each plan's final state key. ``op`` is :func:`layerlens.prefix_reuse.plan_ops`'s (1: the
    layer is skipped); a state key is the tuple of ``(layer, op)`` steps applied so far, so plans with a
    common prefix share it and each (prefix, op) runs once."""
    from .prefix_reuse import plan_ops

    ops = [plan_ops(p) for p in plans]
    where: list[tuple] = [() for _ in plans]
    schedule = []
    for o in range(num_layers):
        todo: dict[Any, list[tuple]] = {}  # op -> distinct current state keys needing it
        for i, plan_ops_i in enumerate(ops):
            op = plan_ops_i[o]
            if op != 1 and where[i] not in todo.setdefault(op, []):
                todo[op].append(where[i])
        for i, plan_ops_i in enumerate(ops):
            if plan_ops_i[o] != 1:
                where[i] = where[i] + ((o, plan_ops_i[o]),)
        schedule.append((todo, set(where)))
    return schedule, where


def pass_units(schedule: Sequence[tuple[dict[Any, list[tuple]], set]]) -> int:
    """Layer runs in a pass (each runs one layer over every batch): the unit of its progress."""
    return max(1, sum(len(keys) for todo, _ in schedule for keys in todo.values()))


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``) after a layer is freed.

    A layer's weights and activations are freed blocks of many sizes; glibc keeps them, so without this the
    process's resident memory creeps up layer after layer (measured: +250-440 MB over 16 layers of a 1.7 GB
    model, vs +145 MB with it) and the peak says more about the allocator than about the budget."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _check_plan(plan: Any, num_layers: int, export: bool = False) -> None:
    plan.validate()
    if plan.num_layers != num_layers:
        raise PlanError(f"The plan is for a {plan.num_layers}-layer model but this model has {num_layers} "
                        "layers; make the plan from this model's report.")
    drops = set(getattr(plan, "drop_attn", ())) | set(getattr(plan, "drop_mlp", ()))
    if drops & set(plan.merge_bases) and not export:  # an export only zeroes the merged output projections
        raise PlanError("Layer-wise mode does not evaluate a merged layer with dropped sub-layers yet; load the "
                        "model in memory (raise `max_memory`).")


def _hub_folder(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many network/cache errors
        raise LayerLensError(f"Could not fetch '{repo_id}' for layer-wise mode ({type(exc).__name__}); "
                             "download it elsewhere and pass its local folder instead.") from exc


# --------------------------------------------------------------------------------------------------------
# Metrics from states that arrive one layer at a time
# --------------------------------------------------------------------------------------------------------


class _SpillAccumulators:
    """The sums of :class:`layerlens.metrics._Accumulators`, fed one state (all batches) at a time.

    Adjacent-state sums (magnitude, per-sample cosines for the bootstrap, sublayer steps) are kept in
    memory; for the (L+1)^2 matrices each state's unit token vectors and per-sample Gram matrices are
    written to memory-mapped files in ``work`` and combined once at the end.
    """

    def __init__(self, num_states: int, hidden: int, masks: list[torch.Tensor], work: Path,
                 spill_dtype: torch.dtype, sublayers: bool = False):
        self.s, self.d = num_states, hidden
        self.masks = masks
        self.batch_tokens = [int(m.sum()) for m in masks]
        self.batch_offset = np.cumsum([0, *self.batch_tokens]).tolist()
        self.tokens = self.batch_offset[-1]
        if self.tokens == 0:
            raise LayerLensError("No tokens were left to measure (texts shorter than `skip_first`?); use "
                                 "longer texts or a smaller `skip_first`.")
        self.lengths = [m.sum(dim=1).tolist() for m in masks]
        self.first_sample = np.cumsum([0, *[len(x) for x in self.lengths]]).tolist()
        gram_sizes = [n * n if n > 3 else 0 for lens in self.lengths for n in lens]
        self.gram_offset = np.cumsum([0, *gram_sizes]).tolist()
        self.cka_minibatches = sum(1 for n in gram_sizes if n)
        np_spill = np.float16 if spill_dtype == torch.float16 else np.float32
        self.spill_torch = torch.float16 if spill_dtype == torch.float16 else torch.float32
        self.unit = np.lib.format.open_memmap(work / "unit.npy", mode="w+", dtype=np_spill,
                                              shape=(num_states, self.tokens, hidden))
        self.grams = np.lib.format.open_memmap(work / "grams.npy", mode="w+", dtype=np.float32,
                                               shape=(num_states, max(self.gram_offset[-1], 1)))
        self.spill_bytes = self.unit.nbytes + self.grams.nbytes
        self.mag_sum = torch.zeros(num_states - 1, dtype=torch.float64)
        n_samples = self.first_sample[-1]
        self.sample_cos = torch.zeros(n_samples, num_states - 1, dtype=torch.float64)
        self.sample_tokens = torch.tensor([n for lens in self.lengths for n in lens], dtype=torch.float64)
        self.sample_sub = torch.zeros(n_samples, 4, num_states - 1, dtype=torch.float64) if sublayers else None

    def add_state(self, s: int, b: int, state: torch.Tensor, prev: torch.Tensor | None = None) -> None:
        keep = self.masks[b].to(state.device)
        x = state.float()
        norms = x.norm(dim=2, keepdim=True)
        if not bool(torch.isfinite(norms[keep]).all()):
            raise LayerLensError(
                f"Non-finite activations (NaN/inf) in residual state h_{s} (states [{s}]); this is "
                "usually float16 overflow: re-run with `dtype=float32` or bfloat16.")
        norms.clamp_min_(1e-12)
        unit_all = x / norms
        unit = unit_all[keep]  # (n_tok, D), row-major order as the in-memory mask selection
        lo, hi = self.batch_offset[b], self.batch_offset[b + 1]
        self.unit[s, lo:hi] = unit.to(self.spill_torch).cpu().numpy()
        rows = slice(self.first_sample[b], self.first_sample[b + 1])
        if prev is not None:
            p = prev.float()
            relative = (x - p).norm(dim=2) / norms[..., 0]
            self.mag_sum[s - 1] += relative[keep].double().sum().cpu()
            p_unit = p / p.norm(dim=2, keepdim=True).clamp_min(1e-12)
            cos = ((p_unit * unit_all).sum(dim=2) * keep).sum(dim=1)  # (B,) summed over kept tokens
            self.sample_cos[rows, s - 1] = cos.double().cpu()
        first = self.first_sample[b]
        for i, n in enumerate(self.lengths[b]):
            if n > 3:
                row = keep[i]
                xs = x[i, :n] if bool(row[:n].all()) else x[i][row]
                g = (xs @ xs.T).cpu().numpy()
                a = self.gram_offset[first + i]
                self.grams[s, a:a + n * n] = g.reshape(-1)

    def unmap_pages(self) -> None:
        """Drop the spill files' pages from this process's mappings (``MADV_DONTNEED`` on a shared file
        mapping: written data stays in the page cache and on disk, the kernel may evict it). Without this the
        spill, touched state by state, would count in the process's resident memory up to its full size."""
        for arr in (self.unit, self.grams):
            mm = getattr(arr, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED)
        _trim_heap()

    def add_sublayers(self, o: int, b: int, before: torch.Tensor, mid: torch.Tensor, after: torch.Tensor) -> None:
        """Layer ``o``'s attention step (before -> mid) and MLP step (mid -> after), per sample, as
        :class:`layerlens.capture.ResidualCapture` computes them (rows attn_cos, attn_rel, mlp_cos, mlp_rel)."""
        keep = self.masks[b].to(before.device).float()
        rows = slice(self.first_sample[b], self.first_sample[b + 1])
        for r, (a, c) in enumerate(((before, mid), (mid, after))):
            a, c = a.float(), c.float()
            na = a.norm(dim=-1).clamp_min(1e-12)
            nc = c.norm(dim=-1).clamp_min(1e-12)
            cos = (a * c).sum(dim=-1) / (na * nc)
            rel = (c - a).norm(dim=-1) / nc
            for k, v in ((2 * r, cos), (2 * r + 1, rel)):
                self.sample_sub[rows, k, o] = (v.nan_to_num() * keep).sum(dim=1).double().cpu()  # type: ignore[index]

    def _last_token_cosines(self) -> torch.Tensor:
        """PruneMe's convention: cosines between states on each sample's last kept token only."""
        index = []
        for b, lens in enumerate(self.lengths):
            ends = np.cumsum(lens).tolist()
            index += [self.batch_offset[b] + e - 1 for e, n in zip(ends, lens, strict=True) if n > 0]
        ends = torch.from_numpy(np.ascontiguousarray(self.unit[:, index])).float()  # (S, R, D)
        return torch.einsum("ard,brd->ab", ends, ends).double() / max(len(index), 1)

    def finish(self, block_distance: str = "all-tokens") -> dict[str, Any]:
        from .metrics import unbiased_hsic_matrix

        s = self.s
        self.unit.flush()
        self.grams.flush()
        cos_sum = torch.zeros(s, s, dtype=torch.float64)
        chunk = max(1, (32 << 20) // (s * self.d * 4))  # tokens read back at once (32 MB in float32)
        sub = max(1, (1 << 17) // self.d)  # tokens per float32 product: short sums, float64 totals
        for lo in range(0, self.tokens, chunk):
            block = torch.from_numpy(np.ascontiguousarray(self.unit[:, lo:lo + chunk])).float()
            for a in range(0, block.shape[1], sub):
                flat = block[:, a:a + sub].reshape(s, -1)
                cos_sum += (flat @ flat.T).double()
            del block
            self.unmap_pages()
        hsic_sum = torch.zeros(s, s, dtype=torch.float64)
        index = 0
        for lens in self.lengths:
            for n in lens:
                if n > 3:
                    a = self.gram_offset[index]
                    grams = torch.from_numpy(np.ascontiguousarray(self.grams[:, a:a + n * n])).view(s, n, n)
                    hsic_sum += unbiased_hsic_matrix(grams)
                index += 1
        self.unmap_pages()
        if self.cka_minibatches == 0:
            raise LayerLensError("Minibatch CKA needs samples of at least 4 tokens; use longer texts.")
        cosine = (cos_sum / self.tokens).clamp(-1.0, 1.0)
        num_layers = s - 1
        bi = [1.0 - float(cosine[i, i + 1]) for i in range(num_layers)]
        dist = self._last_token_cosines().clamp(-1.0, 1.0) if block_distance == "last-token" else cosine
        block = [[math.acos(float(dist[i, i + n])) / math.pi for i in range(num_layers - n + 1)]
                 for n in range(1, num_layers + 1)]
        diag = hsic_sum.diagonal().clamp_min(1e-300)
        cka = hsic_sum / torch.sqrt(torch.outer(diag, diag))
        out = dict(num_layers=num_layers, bi=tuple(bi), cosine=cosine.tolist(), cka=cka.tolist(),
                   block_distance=tuple(tuple(r) for r in block),
                   magnitude=tuple((self.mag_sum / self.tokens).tolist()))
        if self.sample_sub is not None:
            mean = (self.sample_sub.sum(dim=0) / self.tokens).tolist()
            out.update(attn_bi=tuple(1.0 - x for x in mean[0]), attn_magnitude=tuple(mean[1]),
                       mlp_bi=tuple(1.0 - x for x in mean[2]), mlp_magnitude=tuple(mean[3]))
        return out


# --------------------------------------------------------------------------------------------------------
# When to run layer by layer
# --------------------------------------------------------------------------------------------------------


def local_weights_bytes(spec: str, dtype: str = "auto", device: str = "auto") -> int | None:
    """Bytes of a local model's weights in the dtype they would be loaded in; None when not local safetensors."""
    try:
        source = resolve_source(spec)
    except LayerLensError:
        return None
    if isinstance(source, str):
        return None
    try:
        return weights_bytes(source, resolve_dtype(dtype, resolve_device(device)))
    except LayerLensError:
        return None


def wants_layerwise(spec: str, *, layerwise: bool = False, max_memory: str | int | None = None,
                    dtype: str = "auto", device: str = "auto") -> bool:
    """Whether a command should run layer by layer: forced, or the weights exceed ``max_memory``."""
    if layerwise:
        return True
    budget = parse_size(max_memory)
    if budget is None:
        return False
    need = local_weights_bytes(spec, dtype, device)
    return need is not None and need > budget


# --------------------------------------------------------------------------------------------------------
# The faces' entry points: one plan's evaluation, a sweep
# --------------------------------------------------------------------------------------------------------


def eval_tasks(lw: LayerwiseModel, *, texts: Any = None, questions: Any = None, dev: Any = None,
               seq_len: int = 256, ppl_batch_size: int = 4, max_windows: int | None = None, shots: int = 0,
               mmlu_batch_size: int = 8, kl: bool = False) -> list[Any]:
    """The perplexity and MMLU tasks the in-memory :func:`perplexity` / :func:`mmlu` would build."""
    from .data import check_seq_len
    from .evaluation import MMLUTask, PerplexityTask

    tasks: list[Any] = []
    if texts is not None:
        check_seq_len(seq_len, lw.info.max_positions)
        tasks.append(PerplexityTask(lw.tokenizer, texts, seq_len=seq_len, batch_size=ppl_batch_size,
                                    max_windows=max_windows, **({"kl": True} if kl else {})))
    if questions is not None:
        tasks.append(MMLUTask(lw.tokenizer, questions, shots=shots, dev=dev, batch_size=mmlu_batch_size,
                              max_length=lw.harness_max_length(), prefix_cache=False))  # whole prompts per row
    return tasks


def evaluate_plan(lw: LayerwiseModel, plan: Any = None, *, progress: Progress | None = None,
                  **task_args: Any) -> dict[str, Any]:
    """``{"perplexity": PerplexityResult | None, "mmlu": MMLUResult | None}`` of the model pruned by ``plan``
    (None: unpruned), layer by layer; ``task_args`` as :func:`eval_tasks`."""
    from .plans import PrunePlan

    plan = plan if plan is not None else PrunePlan(lw.num_layers, "remove")
    tasks = eval_tasks(lw, **task_args)
    results = lw.evaluate(tasks, [plan], progress=progress)
    out: dict[str, Any] = {"perplexity": None, "mmlu": None}
    for task, row in zip(tasks, results, strict=True):
        out[task.kind] = row[0]
    return out


def leave_one_out(lw: LayerwiseModel, texts: Any, *, sublayers: bool = False, seq_len: int | None = None,
                  max_windows: int | None = None, batch_size: int | None = None,
                  progress: Progress | None = None) -> Any:
    """:func:`layerlens.damage.leave_one_out` layer by layer: perplexity, KL and top-1 agreement with each
    layer (and with ``sublayers`` each attention and MLP sublayer) removed alone, as a
    :class:`~layerlens.damage.DamageResult`.

    All the removals and the original run in ONE pass over the weights: a removal of layer i shares the
    original's states up to i (:func:`pass_schedule`), so the work is the in-memory path's prefix reuse
    (about L²/2 layer runs) while each layer is read once. Not persisted unit by unit (a stopped pass has no
    finished unit before its end); the caller keeps the document."""
    from .damage import (
        DEFAULT_DAMAGE_WINDOWS,
        DEFAULT_PPL_BATCH,
        DEFAULT_SEQ_LEN,
        DamageResult,
        DamageStats,
        UnitDamage,
        unit_plan,
        units_of,
    )
    from .evaluation import PerplexityTask
    from .plans import PrunePlan

    started = time.perf_counter()
    task = PerplexityTask(lw.tokenizer, texts, seq_len=seq_len or DEFAULT_SEQ_LEN, kl=True,
                          batch_size=batch_size or DEFAULT_PPL_BATCH,
                          max_windows=max_windows if max_windows is not None else DEFAULT_DAMAGE_WINDOWS)
    base = PrunePlan(lw.num_layers, "remove", strategy="manual")
    units = units_of(lw.num_layers, sublayers)
    plans = [base, *(unit_plan(base, u) for u in units)]
    (results,) = lw.evaluate([task], plans, progress=progress)
    seconds = time.perf_counter() - started
    schedule, _ = pass_schedule(plans, lw.num_layers)
    done = tuple(UnitDamage(u, r.perplexity, r.nll, r.kl, seconds / len(plans), top1=r.top1_agreement)
                 for u, r in zip(units, results[1:], strict=True))
    stats = DamageStats(computed=len(units), cached=0, layer_passes=pass_units(schedule),
                        layer_passes_from_scratch=sum(len(p.kept_layers) for p in plans), seconds=seconds)
    tid = {k: v for k, v in task.identity().items() if k != "kl"}
    return DamageResult(results[0].perplexity, results[0].nll, done, tid, stats)


def fingerprint(lw: LayerwiseModel) -> dict[str, Any]:
    """A cheap identity of the checkpoint (config, tensor table, sampled bytes of every file), for keys."""
    import hashlib

    h = hashlib.sha256()
    for f in lw.checkpoint.files:
        path = lw.source / f
        size = path.stat().st_size
        h.update(f"{f}:{size}".encode())
        with open(path, "rb") as fh:
            for at in (lw.checkpoint.data_start[f], max(0, size - (64 << 10))):
                fh.seek(at)
                h.update(fh.read(64 << 10))
    from .runs import stable_key

    return {"layerwise_checkpoint": h.hexdigest()[:16], "tensors": stable_key(lw.checkpoint.meta),
            "config": stable_key(lw.config.to_dict()), "dtype": lw.info.dtype, "device": lw.info.device}


def sweep(lw: LayerwiseModel, report: Any = None, config: Any = None, *, ppl_texts: Any = None,
          questions: Any = None, dev: Any = None, progress: Progress | None = None,
          runs_dir: str | Path | None = None, model_id: dict[str, Any] | None = None) -> Any:
    """:func:`layerlens.sweep.sweep` layer by layer: every plan of ``config`` evaluated in one pass over the
    weights (shared prefixes computed once). Same frame columns. With ``runs_dir`` every point is persisted
    (``runs_dir/sweep/points``, keyed by the checkpoint's :func:`fingerprint`, the task and the plan) and read
    back by a later sweep: only plans with a missing point are run."""
    import pandas as pd

    from .runs import provenance, stable_key
    from .sweep import (
        COLUMNS,
        POINT_FORMAT,
        SweepConfig,
        SweepResult,
        SweepStats,
        _point_path,
        _read_point,
        _result_from_dict,
        _row,
        _Unit,
        _write_point,
        effective_plan,
        make_plans,
    )

    config = config or SweepConfig()
    if config.heal is not None:
        raise LayerLensError("Healing needs the model in memory; drop `heal` in layer-wise mode.")
    if ppl_texts is None and questions is None:
        raise LayerLensError("Nothing to evaluate: give perplexity texts, MMLU questions, or both.")
    plans = config.plans
    if plans is None:
        plans = make_plans(report, config.strategies, config.ratios, num_layers=lw.num_layers, seed=config.seed)
    if not plans:
        raise LayerLensError("The sweep has no points; give at least one strategy and one ratio.")
    unique: dict[str, Any] = {}
    for _, _, plan in plans:
        unique.setdefault(stable_key(effective_plan(plan)), plan)
    order = list(unique)
    tasks = eval_tasks(lw, texts=ppl_texts, questions=questions, dev=dev, seq_len=config.seq_len,
                       ppl_batch_size=config.ppl_batch_size, max_windows=config.max_windows, shots=config.shots,
                       mmlu_batch_size=config.mmlu_batch_size, kl="kl" in COLUMNS)
    identity = fingerprint(lw) | {"id": dict(model_id or {"model": lw.info.model, "revision": lw.info.revision})}
    runs = Path(runs_dir) if runs_dir is not None else None
    units: dict[str, list[Any]] = {k: [] for k in order}
    for task in tasks:
        tid = task.identity()
        for k in order:
            unit = _Unit(task, unique[k], stable_key({"format": POINT_FORMAT, "model": identity, "task": tid,
                                                      "plan": effective_plan(unique[k])}))
            saved = _read_point(_point_path(runs, unit.key)) if runs is not None else None
            if saved is not None:
                unit.result = _result_from_dict(task.kind, saved["result"])
                unit.seconds, unit.cached = float(saved.get("seconds", 0.0)), True
            units[k].append(unit)
    todo = [k for k in order if not all(u.cached for u in units[k])]
    lw.stats = ExecutionStats()
    if todo:
        started = time.perf_counter()
        results = lw.evaluate(tasks, [unique[k] for k in todo], progress=progress)
        seconds = (time.perf_counter() - started) / max(1, len(todo) * len(tasks))
        data_source = {"perplexity": getattr(ppl_texts, "source", None), "mmlu": getattr(questions, "source", None)}
        for t in range(len(tasks)):
            for p, k in enumerate(todo):
                unit = units[k][t]
                if not unit.cached:
                    unit.result, unit.seconds = results[t][p], seconds
                    if runs is not None:
                        _write_point(runs, unit, identity, data_source, config)
    rows = [_row(s, r, plan, units[stable_key(effective_plan(plan))]) for s, r, plan in plans]
    meta = provenance(model=lw.info.model, revision=lw.info.revision, dtype=lw.info.dtype, device=lw.info.device,
                      tasks=[t.identity() for t in tasks], seq_len=config.seq_len, max_windows=config.max_windows,
                      shots=config.shots, seed=config.seed, execution="layerwise", layerwise=lw.stats.to_dict())
    passes = lw.stats.layers_loaded
    cached = sum(u.cached for us in units.values() for u in us)
    stats = SweepStats(units=len(order) * len(tasks), computed=len(order) * len(tasks) - cached, cached=cached,
                       peak_states={"layerwise": int(lw.stats.extra.get("peak_states", 0))}, layer_passes=passes,
                       layer_passes_from_scratch=sum(unique[k].num_layers_after for k in order) * len(tasks))
    return SweepResult(pd.DataFrame(rows, columns=list(COLUMNS)), meta, stats)


def open_model(spec: str = "default", *, revision: str | None = None, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, max_memory: str | int | None = None,
               layerwise: bool = False) -> Any:
    """A :class:`~layerlens.loading.LoadedModel`, or a :class:`LayerwiseModel` when ``layerwise`` is set or
    the weights exceed ``max_memory`` (None: ``$LAYERLENS_MAX_MEMORY``, else 90 % of the memory free on the
    device, the limit at which :func:`~layerlens.loading.load_model` would refuse). Both have ``info`` and ``tokenizer``; a layer-wise
    one has ``layerwise = True``."""
    import os

    from .loading import available_bytes, load_model

    max_memory = max_memory if max_memory is not None else os.environ.get("LAYERLENS_MAX_MEMORY") or None
    budget = parse_size(max_memory)
    if budget is None and not layerwise:
        free = available_bytes(resolve_device(device))
        budget = None if free is None else int(0.9 * free)
    need = local_weights_bytes(spec, dtype, device)
    if layerwise or (budget is not None and need is not None and need > budget):
        return LayerwiseModel(spec, revision=revision, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code)
    return load_model(spec, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                      check_memory=max_memory is None)


def per_layer_params(lw: LayerwiseModel) -> tuple[int, ...]:
    """Parameters of each decoder layer (from the skeleton: nothing is read)."""
    return tuple(sum(p.numel() for p in t.parameters()) for t in lw.templates)
