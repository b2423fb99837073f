"""`LayerReport`: every per-layer redundancy metric from one analysis, with provenance."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LayerLensError, check_made_for
from .runs import atomic_write_text

Matrix = tuple[tuple[float, ...], ...]


def _matrix(a: Any) -> Matrix:
    return tuple(tuple(float(x) for x in row) for row in a)


@dataclass(frozen=True)
class LayerReport:
    """Redundancy metrics over residual states h_0..h_L (h_0 = input of layer 0, h_{i+1} = output of layer i).

    Indices are 0-based: ``bi[i]`` and ``magnitude[i]`` describe decoder layer i; ``cosine`` and
    ``cka`` are (L+1)x(L+1) over states; ``block_distance[n-1][i]`` is the angular distance between
    h_i and h_{i+n} (the block of n layers starting at layer i).

    Optional (None in reports made before they existed, or where they do not apply; see
    :mod:`layerlens.metrics`): ``attn_bi``, ``mlp_bi``, ``attn_magnitude``, ``mlp_magnitude`` (length L, the
    attention and MLP sublayer of each layer; None for an architecture without a mid residual);
    ``bi_ci_low``/``bi_ci_high`` and ``attn_bi_ci_*``/``mlp_bi_ci_*`` (bootstrap interval bounds over
    calibration samples), ``rank_stability`` (per layer: fraction of resamples in which it is among the
    ``meta["bootstrap"]["rank_k"]`` lowest BI) and ``bi_rank_freq`` (L x L: layer x rank, 0 = lowest BI).
    """

    num_layers: int
    bi: tuple[float, ...]
    cosine: Matrix
    cka: Matrix
    cka_estimator: str
    block_distance: tuple[tuple[float, ...], ...]
    magnitude: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    attn_bi: tuple[float, ...] | None = None
    mlp_bi: tuple[float, ...] | None = None
    attn_magnitude: tuple[float, ...] | None = None
    mlp_magnitude: tuple[float, ...] | None = None
    bi_ci_low: tuple[float, ...] | None = None
    bi_ci_high: tuple[float, ...] | None = None
    attn_bi_ci_low: tuple[float, ...] | None = None
    attn_bi_ci_high: tuple[float, ...] | None = None
    mlp_bi_ci_low: tuple[float, ...] | None = None
    mlp_bi_ci_high: tuple[float, ...] | None = None
    rank_stability: tuple[float, ...] | None = None
    bi_rank_freq: Matrix | None = None

    def __post_init__(self) -> None:
        # Normalise to tuples of floats, so equality and hashing hold however the report was built.
        object.__setattr__(self, "bi", tuple(float(x) for x in self.bi))
        object.__setattr__(self, "magnitude", tuple(float(x) for x in self.magnitude))
        for name in self.PER_LAYER_OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(x) for x in value))
                if len(getattr(self, name)) != self.num_layers:
                    raise ValueError(f"{name} needs one value per layer")
        if self.bi_rank_freq is not None:
            object.__setattr__(self, "bi_rank_freq", _matrix(self.bi_rank_freq))
        for name in ("cosine", "cka", "block_distance"):
            object.__setattr__(self, name, _matrix(getattr(self, name)))
        n = self.num_layers
        if len(self.bi) != n or len(self.magnitude) != n:
            raise ValueError("bi and magnitude need one value per layer")
        if len(self.cosine) != n + 1 or len(self.cka) != n + 1:
            raise ValueError("cosine and cka are (L+1)x(L+1)")

    PER_LAYER_OPTIONAL = ("attn_bi", "mlp_bi", "attn_magnitude", "mlp_magnitude", "bi_ci_low", "bi_ci_high",
                          "attn_bi_ci_low", "attn_bi_ci_high", "mlp_bi_ci_low", "mlp_bi_ci_high", "rank_stability")

    @property
    def has_sublayers(self) -> bool:
        return self.attn_bi is not None and self.mlp_bi is not None

    def stability(self, k: int) -> tuple[float, ...] | None:
        """Per layer: the fraction of bootstrap resamples in which it is among the ``k`` lowest BI."""
        if self.bi_rank_freq is None:
            return None
        return tuple(float(sum(row[:k])) for row in self.bi_rank_freq)

    # numpy views for algorithms and plots
    def array(self, name: str) -> np.ndarray:
        if name == "block_distance":
            out = np.full((self.num_layers, self.num_layers), np.nan)
            for n_minus_1, row in enumerate(self.block_distance):
                out[n_minus_1, : len(row)] = row
            return out
        return np.asarray(getattr(self, name), dtype=float)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("bi", "magnitude"):
            d[key] = list(d[key])
        for key in ("cosine", "cka", "block_distance"):
            d[key] = [list(r) for r in d[key]]
        for key in (*self.PER_LAYER_OPTIONAL, "bi_rank_freq"):  # absent, not null, when not computed
            if d[key] is None:
                del d[key]
            else:
                d[key] = [list(r) for r in d[key]] if key == "bi_rank_freq" else list(d[key])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        return cls(num_layers=int(d["num_layers"]), bi=tuple(float(x) for x in d["bi"]),
                   cosine=_matrix(d["cosine"]), cka=_matrix(d["cka"]), cka_estimator=d["cka_estimator"],
                   block_distance=tuple(tuple(float(x) for x in r) for r in d["block_distance"]),
                   magnitude=tuple(float(x) for x in d["magnitude"]), meta=dict(d.get("meta", {})),
                   **{k: d.get(k) for k in (*cls.PER_LAYER_OPTIONAL, "bi_rank_freq") if d.get(k) is not None})

    @classmethod
    def load(cls, path: str | Path) -> LayerReport:
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def read(cls, path: str | Path, *, num_layers: int | None = None, model_type: str | None = None) -> LayerReport:
        """Load a user-given report.json, refusing a missing/malformed file or one made for another model."""
        try:
            report = cls.load(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LayerLensError(f"Could not read the report '{path}' ({type(exc).__name__}); pass the "
                                 "report.json written by `layerlens analyze`.") from exc
        made_for = report.meta.get("model_type")
        if model_type is not None and made_for not in (None, model_type):
            raise LayerLensError(f"The report '{path}' was made on a {made_for} model, not this {model_type} "
                                 "model; analyze this model first.")
        check_made_for(f"The report '{path}'", report.num_layers, num_layers, "; analyze this model first")
        return report

    DATA_FIELDS = ("data", "data_description", "samples", "seq_len", "batch_size", "tokens", "skip_first",
                   "seed")

    def data_provenance(self) -> dict[str, Any]:
        """The calibration settings this report was computed from, for the provenance of what it drives."""
        return {k: self.meta.get(k) for k in self.DATA_FIELDS}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / "report.json"
        atomic_write_text(path, self.to_json())
        return path
