"""An event sink that remembers what it was told (an :class:`~meshserve.controlplane.observe.
events.EventSink` for tests of code that records decision events)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Recorded"]


@dataclass
class Recorded:
    """``events``: (kind, model, variant, message) in the order recorded."""

    events: list[tuple[str, str, str, str]] = field(default_factory=list)

    def record(
        self, kind: str, *, model: str = "", variant: str = "", node_id: str = "", message: str = ""
    ) -> None:
        self.events.append((kind, model, variant, message))
