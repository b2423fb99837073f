"""Library errors name parameters; each face renames them (the CLI to its flags) with ``for_interface``."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from layerlens import cli
from layerlens.errors import for_interface

LIBRARY = Path(cli.__file__).parent
SHELL_COMMAND = re.compile(r"pip install[^;)]*")  # a command to paste into a shell, not a CLI flag
CLI_FLAG = re.compile(r"(?<![\w-])--[a-z]")

FLAGS = {"seq_len": "--seq-len", "dtype": "--dtype", "limit": "--mmlu-limit"}


@pytest.mark.parametrize("message, expected", [
    ("`seq_len` must be at least 2 (got 1).", "--seq-len must be at least 2 (got 1)."),
    ("use `seq_len=512` or less.", "use --seq-len 512 or less."),
    ("re-run with `dtype=float32` or bfloat16.", "re-run with --dtype float32 or bfloat16."),
    ("`limit` must be at least 1 (got 0).", "--mmlu-limit must be at least 1 (got 0)."),
    ("lower `seq_len`, `dtype=bfloat16` or `limit`.", "lower --seq-len, --dtype bfloat16 or --mmlu-limit."),
])
def test_mapped_parameters_become_the_interface_names(message, expected):
    assert for_interface(message, FLAGS) == expected


def test_a_name_missing_from_the_map_is_shown_bare():
    assert for_interface("lower `shots` or use `device=cpu`.", FLAGS) == "lower shots or use device=cpu."
    assert for_interface("`seq_len=8` is too short.", {}) == "seq_len=8 is too short."


@pytest.mark.parametrize("message", [
    "The plan removes all 6 layers; keep at least one.",
    "Could not read the report 'r.json'; pass the report.json written by `layerlens analyze`.",
    "",
])
def test_a_message_without_a_parameter_is_unchanged(message):
    assert for_interface(message, FLAGS) == message


def test_any_map_works_for_example_widget_labels():
    labels = {"seq_len": "Sequence length", "dtype": "Precision"}
    assert for_interface("use `seq_len=256` and `dtype=bfloat16`.", labels) == \
        "use Sequence length 256 and Precision bfloat16."


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_cli_flag_in_the_map_exists():
    options = _options(cli.build_parser())
    assert {flag for flag in cli.FLAGS.values() if flag not in options} == set()


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "..."`` constants, so a raise of a named message is checked too."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def _raised_messages(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    named = _module_strings(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", getattr(node.exc.func, "attr", "")).endswith("Error")):
            continue
        parts = []
        for arg in node.exc.args:
            for sub in ast.walk(arg):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    parts.append(sub.value)
                elif isinstance(sub, ast.Name) and sub.id in named:
                    parts.append(named[sub.id])
        found.append((node.lineno, "".join(parts)))
    return found


def test_library_messages_name_parameters_not_cli_flags():
    """The CLI (cli.py, commands/) may name its flags; the library names parameters in backticks."""
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(LIBRARY)
        if rel.parts[0] == "commands" or rel == Path("cli.py"):
            continue
        for line, message in _raised_messages(path):
            if CLI_FLAG.search(SHELL_COMMAND.sub("", message)):
                offenders.append(f"{rel}:{line}: {message}")
    assert offenders == []
