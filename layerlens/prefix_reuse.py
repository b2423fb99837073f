"""Prefix reuse for sweeps: plans that treat their first layers alike share those layers' work.

The residual state at the input of original layer ``o`` depends only on what a plan does to layers
``0..o-1``. :func:`schedule_reuse` orders plans by their per-layer decisions (keep < drop < merge), a
depth-first walk of the tree of shared prefixes, and says for each where to start and which layer inputs
to record; :func:`recording` records them and :func:`tail_forward` runs a plan from a recorded state
(its first layers dropped for the call, a forward pre-hook on the first remaining layer substituting the
recorded input). Substituting the *layer input* leaves everything before the layers untouched (Gemma's
embedding scaling, GPT-2/OPT position embeddings); masks and rotary tables depend only on positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import decoder_layers, layer_count
from .evaluation import EvalBatch, Forward, model_logits
from .plans import PrunePlan
from .surgery import pruned

Ops = tuple[Any, ...]


def plan_ops(plan: Any) -> Ops:
    """What the plan does to each original layer: 0 keep, 1 drop, ``(2, size, formula)`` a merged base,
    ``(3, attention dropped, MLP dropped)`` a kept layer that loses a sublayer.

    The residual state at the input of original layer ``o`` depends only on ``ops[:o]`` (exactly: on
    :func:`state_key`).
    """
    bases = {g[0]: g for g in plan.merge}
    gone = set(plan.removed_layers)
    attn, mlp = set(getattr(plan, "drop_attn", ())), set(getattr(plan, "drop_mlp", ()))

    def op(i: int) -> Any:
        if i in bases:
            return (2, len(bases[i]), plan.merge_formula)
        if i in attn or i in mlp:
            return (3, int(i in attn), int(i in mlp))
        return 1 if i in gone else 0

    return tuple(op(i) for i in range(plan.num_layers))


def state_key(ops: Ops, o: int) -> tuple:
    """Identity of the residual state at the input of original layer ``o``: the layers applied before it
    (index and operation); dropped layers apply nothing, so plans that differ only in which of them
    they drop share the state."""
    return tuple((i, op) for i, op in enumerate(ops[:o]) if op != 1)


def _sort_key(ops: Ops) -> tuple:
    return tuple((op, 0, "") if isinstance(op, int) else op for op in ops)


@dataclass(frozen=True)
class ReuseStep:
    """One plan's run: substitute the input of original layer ``start`` (0: run from the embeddings) and
    record the inputs of the original layers in ``record`` for later plans; ``release`` lists the states
    no longer needed afterwards (by :func:`state_key`)."""

    plan_index: int
    start: int
    record: tuple[int, ...]
    release: tuple[tuple, ...]
    layer_passes: int


def _simulate(ops: list[Ops], kept: list[tuple[int, ...]], order: list[int],
              banned: set[tuple]) -> tuple[list[int], dict[tuple, int], dict[tuple, list[int]]]:
    computed: dict[tuple, int] = {}  # state key -> position (in order) of the run that computes it
    starts = []
    for pos, i in enumerate(order):
        # () is the embedding output: recomputed, never stored (a plan dropping only leading layers)
        cands = [o for o in kept[i] if state_key(ops[i], o) and state_key(ops[i], o) in computed
                 and state_key(ops[i], o) not in banned]
        start = max(cands, default=0)
        starts.append(start)
        for o in kept[i]:
            if o >= start:
                computed.setdefault(state_key(ops[i], o), pos)
    consumers: dict[tuple, list[int]] = {}
    for pos, i in enumerate(order):
        if starts[pos] > 0:
            consumers.setdefault(state_key(ops[i], starts[pos]), []).append(pos)
    return starts, computed, consumers


def schedule_reuse(plans: Sequence[Any], max_states: int | None) -> list[ReuseStep]:
    """The order to run ``plans`` in and, for each, where to start and what to record.

    Plans run in lexicographic order of their decisions (keep before drop), a depth-first walk of the
    tree of shared prefixes; each starts from the deepest state an earlier run recorded, so every
    (prefix, layer) node of the tree is computed once. At most ``max_states`` states (each the inputs of
    one layer for every batch) are held at a time (None: no limit); when the schedule would hold more,
    the states saving the fewest layer passes are not kept and their plans start shallower.
    """
    ops = [plan_ops(p) for p in plans]
    kept = [tuple(p.kept_layers) for p in plans]
    order = sorted(range(len(plans)), key=lambda i: (_sort_key(ops[i]), i))
    banned: set[tuple] = set()
    while True:
        starts, computed, consumers = _simulate(ops, kept, order, banned)
        last_use = {key: max(users) for key, users in consumers.items()}
        live = [sum(1 for key, last in last_use.items() if computed[key] <= pos <= last)
                for pos in range(len(order))]
        if max_states is None or max(live, default=0) <= max_states or not consumers:
            break
        # drop the state whose consumers save the fewest layer passes
        worst = min(consumers, key=lambda key: (len(key) * len(consumers[key]), len(key)))
        banned.add(worst)
    steps = []
    for pos, i in enumerate(order):
        record = tuple(o for o in kept[i] if o > starts[pos] and state_key(ops[i], o) in consumers
                       and computed[state_key(ops[i], o)] == pos)
        release = tuple(key for key, last in last_use.items() if last == pos)
        passes = sum(1 for o in kept[i] if o >= starts[pos])
        steps.append(ReuseStep(i, starts[pos], record, release, passes))
    return steps


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def recording(layers: Mapping[int, torch.nn.Module], into: dict[int, list[torch.Tensor]]) -> Iterator[None]:
    """Append the input of each given layer (one entry per forward) to ``into[o]``, on CPU."""
    handles = []

    def make(o: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            into[o].append(_layer_input(args, kwargs).detach().to("cpu", copy=True))

        return hook

    for o, mod in layers.items():
        into.setdefault(o, [])
        handles.append(mod.register_forward_pre_hook(make(o), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tail_forward(model: torch.nn.Module, skip: int, states: Sequence[torch.Tensor]) -> Forward:
    """A forward for ``model`` as it is now that skips its first ``skip`` decoder layers and feeds the
    next one the recorded ``states[batch_index]`` (the input that layer has in the full pass)."""

    def forward(index: int, batch: EvalBatch) -> torch.Tensor:
        prefix = PrunePlan(layer_count(model), "remove", remove=tuple(range(skip)), strategy="manual")
        with pruned(model, prefix):
            device = next(model.parameters()).device
            cached = states[index]
            handle = decoder_layers(model)[0].register_forward_pre_hook(
                lambda _m, args, kwargs: _replace_hidden(args, kwargs, cached.to(device)), with_kwargs=True)
            try:
                return model_logits(model, batch)
            finally:
                handle.remove()

    return forward


def state_bytes(task: Any, hidden: int, elem: int) -> int:
    """Bytes of one recorded state: the inputs of one layer for every batch of ``task``."""
    return sum(b.input_ids.numel() for b in task.batches) * hidden * elem


def first_affected_layer(plan: Any) -> int:
    """The lowest original layer index the plan removes or changes, a dropped sublayer included
    (``num_layers`` for no change)."""
    idx = list(plan.removed_layers) + [g[0] for g in plan.merge]
    idx += list(getattr(plan, "drop_attn", ())) + list(getattr(plan, "drop_mlp", ()))
    return min(idx) if idx else plan.num_layers
