"""Reading the spans a process printed into its log (``MESHSERVE_TRACE_CONSOLE=1``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["logged_span"]

_START = '{\n    "name"'


def logged_span(log: Path, trace_id: str, name: str | None = None) -> dict[str, Any] | None:
    """The first span of trace ``trace_id`` (hex, no 0x) in ``log`` -- named ``name`` when
    given -- or None while there is none."""
    text = log.read_text(errors="replace")
    decoder = json.JSONDecoder()
    at = text.find(_START)
    while at >= 0:
        try:
            span, end = decoder.raw_decode(text, at)
        except ValueError:
            end = at + 1
        else:
            same = span.get("context", {}).get("trace_id") == f"0x{trace_id}"
            if same and (name is None or span.get("name") == name):
                return dict(span)
        at = text.find(_START, end)
    return None
