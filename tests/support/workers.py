"""Closed-loop query workers in threads, started and stopped by a ``with`` block."""

from __future__ import annotations

import threading
from typing import Self

__all__ = ["Workers"]


class Workers:
    """``workers`` threads running ``self._run(index)`` (a subclass's loop, which must end on
    its own bound and when ``self._stop`` is set); ``with`` starts them, leaving the block sets
    the stop and joins each (15 s at most)."""

    def __init__(self, workers: int) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
