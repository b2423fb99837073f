"""The strategy registry: one table entry per pruning strategy, read by every consumer.

An entry (:class:`Strategy`) says everything the library, the CLI, the dashboard, the plots and the sweeps
need to know about a strategy: its name, label and colour, how its size is given, whether it needs a
report, calibration data or forward passes, its parameters with their ranges, its builder and its
one-line reason. Adding a strategy means one :func:`register` call with its builder and nothing else
(mergekit's ``REGISTERED_MERGE_METHODS``, lm-eval's task registry). The built-in entries are in
:mod:`layerlens.plans.strategies`.

This module imports no strategy and no model code, so the plan type and every strategy module can
import it without a circle.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapters import layer_count
from ..errors import PlanError
from .plan import STRATEGY_NAMES, PrunePlan

if TYPE_CHECKING:
    from ..report import LayerReport

# How a strategy's size is given: a layer count (``ratio`` or ``n``), a similarity threshold, either a
# threshold or a target ratio, or explicit layers.
SIZES = ("count", "threshold", "threshold_or_ratio", "layers")


@dataclass(frozen=True)
class Param:
    """One parameter of a strategy: its name (the library keyword), kind, default, allowed range or choices."""

    name: str
    kind: type
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    hi_open: bool = False  # the range is [lo, hi) rather than [lo, hi]
    choices: tuple[Any, ...] = ()
    help: str = ""

    def check(self, value: Any) -> Any:
        """The value, or :class:`PlanError` naming the parameter and its allowed range."""
        if self.choices:
            if value not in self.choices:
                raise PlanError(f"`{self.name}` must be one of {', '.join(map(str, self.choices))} "
                                f"(got {value!r}).")
            return value
        number = self.kind in (int, float)
        if number and (isinstance(value, bool) or not isinstance(value, (int, float))
                       or (self.kind is int and not isinstance(value, int))
                       or not math.isfinite(value)):
            raise PlanError(f"`{self.name}` must be a{'n integer' if self.kind is int else ' number'} "
                            f"(got {value!r}).")
        if number and not self.in_range(value):
            raise PlanError(f"`{self.name}` {value!r} is outside {self.range_text()}.")
        return value

    def in_range(self, value: float) -> bool:
        above = self.lo is None or value >= self.lo
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def range_text(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"[{lo}, {hi}{')' if self.hi_open else ']'}"


# The parameters the built-in strategies share (one definition each, so ranges agree everywhere).
RATIO = Param("ratio", float, lo=0.0, hi=1.0, hi_open=True,
              help="fraction of layers to remove: k = round(ratio * L)")
N = Param("n", int, lo=0, help="number of layers to remove (instead of ratio)")
THRESHOLD = Param("threshold", float, lo=-1.0, hi=1.0, help="similarity threshold")
SEED = Param("seed", int, default=0, help="random seed")


@dataclass(frozen=True)
class PlanRequest:
    """What :func:`make_plan` was asked for, handed to a strategy's builder.

    ``options`` holds the strategy's own keywords (``criterion``, ``formula``, ``model``, ...); a builder
    takes what it knows with :meth:`option` and calls :meth:`no_extra` so unknown options are refused.
    """

    strategy: str
    num_layers: int
    report: LayerReport | None = None
    ratio: float | None = None
    n: int | None = None
    threshold: float | None = None
    layers: tuple[int, ...] | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # for the forward-pass strategies (with options tokenizer, token_lists)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.pop(name, default)

    def no_extra(self) -> None:
        if self.options:
            raise PlanError(f"Strategy '{self.strategy}' does not take option(s) {', '.join(sorted(self.options))}.")

    def need_report(self) -> LayerReport:
        if self.report is None:
            raise PlanError(
                f"Strategy '{self.strategy}' ranks layers by their measured redundancy; run the analysis "
                "first (layerlens analyze) and pass its report."
            )
        return self.report


Builder = Callable[[PlanRequest], "PrunePlan"]
Reason = Callable[[Any, "PrunePlan"], str]


@dataclass(frozen=True)
class Strategy:
    """One registry entry (see the module docstring).

    ``builder`` is a callable or a ``"module:function"`` string, imported on first use (the forward-pass
    strategies need :mod:`layerlens.surgery`, which must not be imported by the plan type's package).
    ``forward_criteria``: values of the ``criterion`` option that probe the model with forward passes on
    calibration data instead of reading the report (SLM's ``output``).
    """

    name: str
    label: str
    color: str
    summary: str
    builder: Builder | str
    reason: Reason
    size: str = "count"
    needs_report: bool = False
    needs_data: bool = False
    forward_criteria: tuple[str, ...] = ()
    contiguous: bool = False  # removes one contiguous span (a trained layer can replace it)
    on_prune_page: bool = True  # offered by the dashboard's "Strategy + ratio" picker (count strategies)
    sweep_default: bool = False  # one of the curves a sweep draws when none are named
    params: tuple[Param, ...] = ()

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise PlanError(f"Strategy '{self.name}': size must be one of {', '.join(SIZES)}.")

    def uses_report(self, criterion: str | None = None) -> bool:
        """Whether building the plan reads a report (with this ``criterion`` option, if any)."""
        return self.needs_report and criterion not in self.forward_criteria

    def uses_data(self, criterion: str | None = None) -> bool:
        """Whether building the plan runs the model on calibration data (forward passes)."""
        return self.needs_data or (criterion is not None and criterion in self.forward_criteria)

    @property
    def sweepable(self) -> bool:
        """A ratio alone sizes it, so a sweep can draw its curve against the pruning ratio."""
        return self.size in ("count", "threshold_or_ratio")

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def build(self, request: PlanRequest) -> PrunePlan:
        builder = self.builder
        if isinstance(builder, str):
            module, _, attr = builder.partition(":")
            builder = getattr(importlib.import_module(module), attr)
        return builder(request)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Add ``strategy`` to the table (every consumer sees it from then on)."""
    if strategy.name in _REGISTRY and not replace:
        raise PlanError(f"A strategy named '{strategy.name}' is already registered.")
    _REGISTRY[strategy.name] = strategy
    STRATEGY_NAMES[strategy.name] = None
    return strategy


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
    STRATEGY_NAMES.pop(name, None)


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[str(name).lower()]
    except KeyError:
        raise PlanError(f"Unknown strategy '{name}'; use one of {', '.join(_REGISTRY)}.") from None


def strategies(**flags: Any) -> tuple[Strategy, ...]:
    """Entries in registration order, filtered by attribute values, e.g. ``strategies(sweepable=True)``."""
    return tuple(s for s in _REGISTRY.values() if all(getattr(s, k) == v for k, v in flags.items()))


def strategy_names(**flags: Any) -> tuple[str, ...]:
    return tuple(s.name for s in strategies(**flags))


def label_of(name: str) -> str:
    """The human label of a strategy (the name itself for one that is not registered, e.g. 'current')."""
    entry = _REGISTRY.get(name)
    return entry.label if entry is not None else name


def make_plan(
    strategy: str,
    report: LayerReport | None = None,
    *,
    ratio: float | None = None,
    n: int | None = None,
    threshold: float | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    **kw: Any,
) -> PrunePlan:
    """A plan from a strategy name, built by its registry entry.

    ``ratio`` (k = round(ratio * L)) or ``n`` choose how many layers go; ``threshold`` drives ``slm`` /
    ``laco``; ``layers`` lists ``manual`` indices. Extra keywords: ``num_layers`` (when there is no
    report), ``criterion``, ``keep_last``, ``formula`` (slm/laco), ``merge`` (manual merge groups), and
    ``model``, ``tokenizer``, ``token_lists`` for the forward-pass criteria (slm ``criterion="output"``,
    laco), plus their own options.
    """
    entry = get_strategy(strategy)
    num_layers = kw.pop("num_layers", None)
    if report is not None:
        if num_layers is not None and num_layers != report.num_layers:
            raise PlanError(
                f"num_layers={num_layers} does not match the report's {report.num_layers} layers."
            )
        num_layers = report.num_layers
    model = kw.pop("model", None)
    if num_layers is None and model is not None:
        num_layers = layer_count(model)
    if num_layers is None:
        raise PlanError(f"Strategy '{entry.name}' needs the model's layer count: pass a report or num_layers.")
    if int(num_layers) < 1:
        raise PlanError(f"The model has {int(num_layers)} layers; there is nothing to prune.")
    request = PlanRequest(entry.name, int(num_layers), report, ratio, n, threshold,
                          None if layers is None else tuple(layers), seed, dict(kw), model)
    return entry.build(request)

