"""Load a causal LM (local folder, hub id, or the bundled default) with a clear error for every misuse."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .adapters import adapter_for, layer_count, num_layers_of
from .defaults import DEFAULT_MODEL_ID, default_model_dir
from .errors import LayerLensError, ResourceError, UnsupportedArchitectureError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for provenance and for the dashboard's model card."""

    model: str
    revision: str | None
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_parameters: int
    dtype: str
    device: str
    max_positions: int | None
    source_path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    checkpoint_dtype: str | None = None  # what config.json declares ("bfloat16"); exports default to it


def declared_dtype(config: Any) -> str | None:
    """The dtype a config says its weights are stored in (``dtype``, or the older ``torch_dtype``), by name."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return value if isinstance(value, str) and value in DTYPES else None


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LayerLensError(f"Device '{device}' was requested but CUDA is not available; use `device=cpu`.")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise LayerLensError(f"Unknown dtype '{dtype}'; choose one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def max_positions(config: Any) -> int | None:
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_hub_id(spec: str) -> bool:
    """``org/name``, or a bare ``name`` as the hub still serves (``gpt2``), in the characters hub ids allow.

    The one rule by which the CLI, the library and the dashboard tell a hub id from a typed path.
    """
    return _HUB_ID.fullmatch(spec or "") is not None


def looks_like_path(spec: str, base: Path | None = None) -> bool:
    """Whether a model spec was meant as a folder: it starts like a path (``./``, ``../``, ``/``, ``~``)
    or its parent folder exists (``models/x`` where ``models/`` is a folder in ``base``, default the cwd).

    Such a spec that does not exist is a missing folder, not a hub id to look up (``models/x`` also has
    the shape of ``org/name``, and an offline user would otherwise hear that the hub cannot be reached).
    """
    text = (spec or "").strip()
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or "\\" in text:
        return True
    parent = Path(text).parent
    if str(parent) in ("", "."):
        return False
    return ((base or Path.cwd()) / parent).is_dir()


def missing_folder(spec: str, where: str = "") -> LayerLensError:
    """The one message, for the CLI and the dashboard alike, for a model folder that is not there."""
    return LayerLensError(f"The folder '{spec}' does not exist{where}; check the path (a hub id looks like "
                          "'org/name'; 'default' is the bundled model).")


def resolve_source(spec: str) -> Path | str:
    """A local folder (checked), the bundled default's folder, or a hub id (returned as str)."""
    if spec == DEFAULT_MODEL_ID:
        return default_model_dir()
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LayerLensError(f"'{spec}' is a file; pass the model folder that holds config.json.")
        if not (path / "config.json").exists():
            raise LayerLensError(f"The folder '{spec}' has no config.json; point `model` at a saved "
                                 "Hugging Face model folder (save_pretrained output).")
        return path
    if looks_like_path(spec):
        raise missing_folder(spec)
    if not is_hub_id(spec):
        raise LayerLensError(f"Model '{spec}' is neither an existing folder nor a hub id like 'org/name'; "
                             "check the path, or use 'default' for the bundled model.")
    return spec


def estimate_bytes(config: Any, dtype: torch.dtype) -> int:
    """Parameter memory from the config alone (before loading), for an early, numbered refusal."""
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    v = getattr(config, "vocab_size", 0)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * h
    n_layers = num_layers_of(config)
    per_layer = 4 * h * h + 3 * h * inter
    params = n_layers * per_layer + v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return int(params * torch.finfo(dtype).bits // 8)


def available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline user gets an answer in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_locally(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache  # heavy: only for a hub id

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - any cache-lookup failure just means "not cached"
        return False


def _load_config(source: Path | str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig  # heavy (~1 s): only when loading a model

    if isinstance(source, str) and not _cached_locally(source, revision) and not hub_reachable():
        raise LayerLensError(f"Could not load model '{source}': the Hugging Face Hub cannot be reached from "
                             "here (offline?); download the model elsewhere and pass its local folder instead.")

    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if isinstance(source, str):
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower() \
                or "offline" in str(exc).lower() or "resolve" in str(exc).lower()
            hint = ("the Hugging Face Hub cannot be reached from here (offline?); download the model "
                    "elsewhere and pass its local folder instead" if offline else
                    "check the id and revision, or pass a local folder")
            raise LayerLensError(f"Could not load model '{source}': {hint}.") from exc
        raise LayerLensError(f"Could not read the config in '{source}': {exc}.") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LayerLensError(f"Model '{source}' needs custom code; re-run with `trust_remote_code` "
                                 "only if you trust its authors.") from exc
        raise LayerLensError(f"Unsupported model config in '{source}': {str(exc).splitlines()[0]}") from exc


def load_model(spec: str = "default", *, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", device_map: str | None = None,
               trust_remote_code: bool = False, check_memory: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on the resolved device.

    ``spec`` is a local folder, a hub id (``org/name``, with ``revision``), or ``default``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy (~1 s): only when loading
    from transformers.utils import logging as hf_logging  # heavy: as above

    hf_logging.disable_progress_bar()
    source = resolve_source(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = _load_config(source, revision, trust_remote_code)
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or model_type in ("bert", "roberta", "t5", "distilbert",
                                                                        "deberta", "electra", "xlm-roberta"):
        raise LayerLensError(f"'{spec}' is a {model_type} model, not a decoder-only causal LM; LayerLens "
                             "analyses causal LMs (llama, qwen2, gpt2, ...).")
    num_layers_of(config)
    if check_memory and device_map is None:
        need, free = estimate_bytes(config, torch_dtype), available_bytes(dev)
        if free is not None and need > 0.9 * free:
            raise ResourceError(
                f"Loading '{spec}' in {dtype_name(torch_dtype)} needs about {need / 2**30:.1f} GiB but only "
                f"{free / 2**30:.1f} GiB is free on {dev}; try `dtype=bfloat16`, a smaller model, or "
                "`device_map=auto`.")
    kwargs: dict[str, Any] = dict(revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError as exc:
        raise ResourceError(f"Out of memory while loading '{spec}'; try `dtype=bfloat16` or "
                            "`device_map=auto`.") from exc
    except ValueError as exc:
        raise UnsupportedArchitectureError(
            f"'{spec}' (model type '{model_type}') is not a causal LM that transformers can load: "
            f"{str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors/torch raise many types for bad files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerLensError(f"The weights of '{spec}' could not be read ({first}); the files may be "
                             "corrupt or truncated: re-download or re-save the model.") from exc
    if device_map is None:
        model.to(dev)
    model.eval()
    adapter_for(model)  # unsupported architectures fail here, before any work
    if isinstance(source, Path):  # a LayerLens-pruned folder: its dropped sublayers are skipped again
        from .export import skip_recorded_sublayers

        model = skip_recorded_sublayers(model, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LayerLensError(f"'{spec}' has no usable tokenizer ({str(exc).splitlines()[0]}); save the "
                             "tokenizer next to the model.") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    device_str = str(next(model.parameters()).device)
    info = ModelInfo(
        model=spec, revision=revision, model_type=model_type,
        architecture=(config.architectures or [type(model).__name__])[0],
        num_layers=layer_count(model),
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0),
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtype_name(torch_dtype), device=device_str, max_positions=max_positions(config),
        source_path=str(source),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, checkpoint_dtype=declared_dtype(config))
