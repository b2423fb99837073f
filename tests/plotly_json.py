"""Reading the figures an AppTest run drew: each plotly chart's JSON, and its arrays as numpy."""

from __future__ import annotations

import base64
import json

import numpy as np


def figures(at) -> list[dict]:
    """Every plotly chart of the AppTest run, as its JSON spec, in page order."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def array(v) -> np.ndarray:
    """A plotly JSON array: a plain list, or plotly 6+'s typed array {dtype, bdata, shape}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = [int(x) for x in str(v.get("shape", len(a))).split(",")]
        return a.reshape(shape)
    return np.asarray(v)
