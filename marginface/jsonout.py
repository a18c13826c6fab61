"""JSON that is always JSON: `json_safe` turns NaN/inf into null and numpy values into plain
ones; `dumps` refuses anything left non-finite (``allow_nan=False``). Torch-free, so the light
commands (``data inspect --json``) do not pay for importing torch."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy scalars/arrays -> Python numbers/lists."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if callable(getattr(obj, "tolist", None)):  # torch tensors and the like
        return json_safe(obj.tolist())
    return str(obj)


def dumps(obj: Any, **kw) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kw)
