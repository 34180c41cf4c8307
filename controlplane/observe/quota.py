"""Per-kind and per-model quotas of the decision-event ring (pure; injectable clock).

Contract: :meth:`EventQuota.admit` says whether one more event of ``kind`` about ``model`` may be
recorded now. Each kind may use ``kind_share`` of the ring's capacity (at least
:data:`MIN_KIND_BURST` events) within ``window_s`` (a
token bucket refilled at that rate, full at the start), and each (kind, model) pair with a model
``per_model`` events within ``window_s``, so one kind (e.g. drift about many models) or one
model cannot erase the history of the others. Refusals are counted per kind
(:attr:`EventQuota.refused`). The per-model buckets are bounded (:data:`MAX_TRACKED`): full
buckets are forgotten first (they are equivalent to new ones), then the oldest quarter.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_TRACKED", "MIN_KIND_BURST", "EventQuota"]

MAX_TRACKED: Final = 4096
#: A kind may always record this many per window (a small ring is a test's or a demo's).
MIN_KIND_BURST: Final = 50


class _Bucket:
    __slots__ = ("tokens", "when")

    def __init__(self, tokens: float, when: float) -> None:
        self.tokens = tokens
        self.when = when


class EventQuota:
    """See the module contract."""

    def __init__(
        self,
        capacity: int,
        *,
        kind_share: float = 0.25,
        per_model: int = 30,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kind_burst = max(float(MIN_KIND_BURST), capacity * kind_share)
        self._model_burst = float(max(1, per_model))
        self._window = window_s
        self._clock = clock
        self._kinds: dict[str, _Bucket] = {}
        self._models: dict[tuple[str, str], _Bucket] = {}
        self.refused: Counter[str] = Counter()

    def _take(self, bucket: _Bucket, burst: float, now: float) -> bool:
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.when) * burst / self._window)
        bucket.when = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def admit(self, kind: str, model: str) -> bool:
        """True: record it (its tokens are spent); False: refused, counted."""
        now = self._clock()
        kind_bucket = self._kinds.setdefault(kind, _Bucket(self._kind_burst, now))
        model_bucket = None
        if model:
            model_bucket = self._models.get((kind, model))
            if model_bucket is None:
                self._forget(now)
                model_bucket = self._models[(kind, model)] = _Bucket(self._model_burst, now)
        # refill both first, so a refusal by one does not spend the other's token
        ok_model = model_bucket is None or self._peek(model_bucket, self._model_burst, now)
        if ok_model and self._take(kind_bucket, self._kind_burst, now):
            if model_bucket is not None:
                model_bucket.tokens -= 1.0
            return True
        self.refused[kind] += 1
        return False

    def _peek(self, bucket: _Bucket, burst: float, now: float) -> bool:
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.when) * burst / self._window)
        bucket.when = now
        return bucket.tokens >= 1.0

    def _forget(self, now: float) -> None:
        if len(self._models) < MAX_TRACKED:
            return
        full = [
            key
            for key, b in self._models.items()
            if b.tokens + (now - b.when) * self._model_burst / self._window >= self._model_burst
        ]
        for key in full:
            del self._models[key]
        if len(self._models) >= MAX_TRACKED:  # then the oldest quarter (amortised)
            for key in list(self._models)[: MAX_TRACKED // 4]:
                del self._models[key]
