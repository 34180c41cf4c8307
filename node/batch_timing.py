"""How big a batch may be and how long batches take: the batcher's policy and timing model.

Contract:

* :class:`BatchPolicy` is the batcher's immutable configuration, validated when built (a bad
  value raises :class:`ValueError` naming the field).
* :class:`BatchTiming` learns execution latency from finished batches: an EWMA (alpha 0.3) per
  power-of-two batch-size bucket, and one over all batches.
  :meth:`BatchTiming.expected` answers for a size with its bucket's estimate, else the overall
  one, else None (no batch finished yet).
* Adaptive mode (``adaptive`` with ``latency_slo_ms``): the cap (:attr:`BatchTiming.cap`) starts
  at ``max_batch_size``, halves (min 1) after a batch slower than the SLO and grows by
  ``max(1, max_batch_size // 16)`` (never above ``max_batch_size``) after a batch faster than
  0.8 x SLO that left compatible requests queued. Without it the cap stays ``max_batch_size``.
* Pure bookkeeping: no clock, no I/O; the batcher measures and reports each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchPolicy", "BatchTiming"]

_EWMA_ALPHA = 0.3
_GROW_BELOW = 0.8  # adaptive: grow while a batch takes less than this fraction of the SLO


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32  # rows
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue: int = 1024  # requests
    adaptive: bool = False
    latency_slo_ms: float | None = None
    max_concurrent_batches: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        bad = [p for p in self.preferred_batch_sizes if not 1 <= p <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {bad} outside 1..max_batch_size ({self.max_batch_size})"
            )
        if self.latency_slo_ms is not None and not self.latency_slo_ms > 0:
            raise ValueError(f"latency_slo_ms must be > 0, got {self.latency_slo_ms}")
        if self.adaptive and self.latency_slo_ms is None:
            raise ValueError("adaptive batching needs latency_slo_ms")


def _bucket(rows: int) -> int:
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


class BatchTiming:
    """Latency estimates and the adaptive cap of one batcher (see the module contract)."""

    def __init__(self, policy: BatchPolicy) -> None:
        self._policy = policy
        self.cap = policy.max_batch_size
        self._step = max(1, policy.max_batch_size // 16)
        self._latency: dict[int, float] = {}  # EWMA seconds per batch-size bucket
        self._latency_all: float | None = None

    def expected(self, rows: int) -> float | None:
        """EWMA execution seconds of batches of about ``rows`` rows (None before any batch)."""
        return self._latency.get(_bucket(rows), self._latency_all)

    def observe(self, rows: int, latency: float, backlog: bool) -> None:
        """A batch of ``rows`` rows took ``latency`` seconds; ``backlog``: it left compatible
        requests queued."""
        bucket = _bucket(rows)
        prev = self._latency.get(bucket)
        self._latency[bucket] = latency if prev is None else prev + _EWMA_ALPHA * (latency - prev)
        prev = self._latency_all
        self._latency_all = latency if prev is None else prev + _EWMA_ALPHA * (latency - prev)
        slo_ms = self._policy.latency_slo_ms
        if not self._policy.adaptive or slo_ms is None:
            return
        if latency > slo_ms / 1000:
            self.cap = max(1, self.cap // 2)
        elif latency < _GROW_BELOW * slo_ms / 1000 and backlog:
            self.cap = min(self._policy.max_batch_size, self.cap + self._step)
