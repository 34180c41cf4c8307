"""What every benchmark script does with its result: one JSON object on stdout (and a file), and
the median and [min, max] of a figure measured over several runs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: Path | None = None) -> None:
    """Print ``result`` as indented JSON; also write it to ``out`` when given."""
    text = json.dumps(result, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def spread(values: Iterable[float | None], digits: int = 4) -> dict[str, Any] | None:
    """``{"median": m, "range": [min, max]}`` of the values that are not None (None if none)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return {
        "median": round(statistics.median(kept), digits),
        "range": [round(min(kept), digits), round(max(kept), digits)],
    }
