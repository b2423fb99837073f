"""`layerlens` command line: thin subcommands over the library, one clear sentence on user errors."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import __version__, metrics
from .data import load_texts
from .errors import LayerLensError, for_interface
from .loading import load_model
from .runs import write_error_log

# Each module in layerlens/commands exposes register(subparsers); its parser sets func=run(args) -> int.
COMMANDS = ("analyze", "prune", "heal", "evaluate", "sweep", "damage", "compare")

# Library messages name parameters (`seq_len`, `dtype=float32`); the CLI names its flags instead.
FLAGS = {
    "model": "--model", "dtype": "--dtype", "device": "--device", "device_map": "--device-map",
    "trust_remote_code": "--trust-remote-code", "samples": "--samples", "seq_len": "--seq-len",
    "batch_size": "--batch-size", "cka_estimator": "--cka", "skip_first": "--skip-first",
    "max_windows": "--max-windows", "shots": "--shots", "limit": "--mmlu-limit", "dev": "--mmlu-dev",
    "mmlu": "--mmlu", "strategy": "--strategy", "criterion": "--criterion", "layers": "--remove",
    "epochs": "--epochs", "ratio": "--ratio", "n": "--n", "threshold": "--threshold", "formula": "--formula",
    "keep_last": "--keep-last", "m": "--laco-m", "interval": "--laco-interval", "seed": "--seed",
    "steps": "--steps", "seconds": "--seconds", "lr": "--lr", "lora_rank": "--lora-rank", "loss": "--loss",
    "targets": "--targets", "temperature": "--temperature", "kd_weight": "--kd-weight",
    "eval_windows": "--eval-windows", "eval_every": "--eval-every",
    "tasks": "--tasks",
    "address": "--ray", "workers": "--ray-workers",
    "max_memory": "--max-memory", "layerwise": "--layerwise",
    "drop_attn": "--drop-attn", "drop_mlp": "--drop-mlp", "last_state": "--last-state",
    "block_distance": "--block-distance", "bootstrap": "--bootstrap", "rank_k": "--rank-k",
    "sublayers": "--sublayers", "metric": "--metric", "k": "--k",
}


def add_model_args(p: argparse.ArgumentParser, *, repeat: bool = False) -> None:
    """The model flags; ``repeat``: --model may be given several times (a list, None when not given)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None if repeat else "default", action="append" if repeat else "store",
                   help="local folder, hub id (org/name), or 'default' (bundled SmolLM2-135M)"
                        + ("; repeat it to study several models" if repeat else ""))
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--device-map", default=None, help="'auto' to spread a large model over devices")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (only for authors you trust)")


def add_data_args(p: argparse.ArgumentParser, *, samples: int = 64, seq_len: int = 256, repeat: bool = False) -> None:
    """The calibration flags; ``repeat``: --data may be given several times (a list, None when not given)."""
    g = p.add_argument_group("calibration data")
    g.add_argument("--data", default=None if repeat else "default", action="append" if repeat else "store",
                   help="'default' (bundled Shakespeare), 'prose', a .txt/.jsonl/.json/.csv/.parquet file, "
                        "or a hub dataset name[:config][:split]" + ("; repeat it to study several" if repeat else ""))
    g.add_argument("--text-field", default="text", help="field/column holding the text")
    g.add_argument("--samples", type=int, default=samples, help="number of calibration texts")
    g.add_argument("--seq-len", type=int, default=seq_len, help="tokens per text (longer texts truncated)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--cka", dest="cka_estimator", default="minibatch", choices=["minibatch", "exact"],
                   help="CKA estimator: unbiased minibatch HSIC (default) or exact feature-space")
    g.add_argument("--skip-first", type=int, default=0, metavar="N",
                   help="leave the first N tokens of every sample out of every metric (e.g. 1 for an "
                        "attention-sink first token, whose huge norm dominates linear CKA); default 0")
    g.add_argument("--seed", type=int, default=0)


def add_layerwise_args(p: argparse.ArgumentParser) -> None:
    """--max-memory / --layerwise (analyze, eval, sweep, prune): models larger than memory, layer by layer."""
    g = p.add_argument_group("models larger than memory")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget for weights, e.g. 1GB or 512MB: a model whose weights exceed it runs layer "
                        "by layer (one decoder layer's weights in memory at a time)")
    g.add_argument("--layerwise", action="store_true",
                   help="run layer by layer whatever the model's size (local safetensors folders)")


def add_runs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default=None, help="where every result is persisted (default ./runs)")


def load_from_args(args: argparse.Namespace) -> Any:
    """A loaded model, or a :class:`layerlens.layerwise.LayerwiseModel` (same ``info`` and ``tokenizer``) when
    --layerwise is given or the weights exceed --max-memory."""
    if getattr(args, "layerwise", False) or getattr(args, "max_memory", None):
        from .layerwise import LayerwiseModel, wants_layerwise  # only with the layer-wise flags

        if wants_layerwise(args.model, layerwise=args.layerwise, max_memory=args.max_memory, dtype=args.dtype,
                           device=args.device):
            from .runs import default_runs_dir

            runs = getattr(args, "runs_dir", None)  # spills and mapped states go to the runs folder, not /tmp
            return LayerwiseModel(args.model, revision=args.revision, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code,
                                  work_dir=(Path(runs) if runs else default_runs_dir()) / "layerwise")
    return load_model(args.model, revision=args.revision, dtype=args.dtype, device=args.device,
                      device_map=args.device_map, trust_remote_code=args.trust_remote_code)


def cli_progress(desc: str):
    """A tqdm-backed progress callback (done, total, message) for long work; silent when not a TTY."""
    bar: dict[str, Any] = {}

    def progress(done: int, total: int, message: str = "") -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.set_postfix_str(message, refresh=False)
        b.refresh()
        if done >= total:
            b.close()

    return progress


def capture_config_from_args(args: argparse.Namespace):
    return metrics.CaptureConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                 cka_estimator=args.cka_estimator, skip_first=args.skip_first, seed=args.seed,
                                 last_state=getattr(args, "last_state", "pre-norm"),
                                 block_distance=getattr(args, "block_distance", "all-tokens"),
                                 bootstrap=getattr(args, "bootstrap", 1000),
                                 rank_k=getattr(args, "rank_k", None))


def analyze_from_args(args: argparse.Namespace, loaded: Any):
    """Run the analysis described by the data args on a loaded model (used by analyze, prune, sweep)."""
    texts = load_texts(args.data, role="calibration", field=args.text_field)
    meta = dict(model=loaded.info.model, revision=loaded.info.revision, model_type=loaded.info.model_type,
                dtype=loaded.info.dtype, device=loaded.info.device)
    if getattr(loaded, "layerwise", False):
        return loaded.analyze(texts, capture_config_from_args(args), progress=cli_progress("analyze (layers)"),
                              meta=meta)
    meta["execution"] = "in_memory"
    return metrics.analyze(loaded.model, loaded.tokenizer, texts, capture_config_from_args(args),
                           progress=cli_progress("analyze"), meta=meta)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerlens", description=__doc__)
    parser.add_argument("--version", action="version", version=f"layerlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"layerlens.commands.{name}").register(sub)
    return parser


def unexpected_error(exc: BaseException, runs_dir: str | None, argv: list[str] | None = None) -> str:
    """The one sentence a user sees for a bug or an unforeseen failure; the traceback goes to a log file
    under the runs folder (never to the terminal)."""
    details = "".join(traceback.format_exception(exc))
    log = write_error_log(f"layerlens {__version__}\ncommand: layerlens {' '.join(argv or sys.argv[1:])}\n\n"
                          f"{details}", runs_dir)
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no message"
    where = f"the full log is in {log}" if log else "no log could be written"
    return f"unexpected {type(exc).__name__} ({first}); {where}."


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 a user error (one sentence), 1 an unexpected error (one
    sentence + a log file with the traceback), 130 interrupted."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # a usage error exits 2 here (SystemExit passes through)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except LayerLensError as exc:
        print(f"error: {for_interface(str(exc), FLAGS)}", file=sys.stderr)
        return exc.exit_code
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        where = exc.filename or "the output path"
        print(f"error: cannot write to '{where}' ({exc.strerror}); choose an --out folder that is not a "
              "file and that you can write to.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished results were kept; re-run the same command to resume.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for a CLI user
        print(f"error: {unexpected_error(exc, getattr(args, 'runs_dir', None), argv)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
