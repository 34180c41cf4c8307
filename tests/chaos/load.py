"""A bounded closed-loop load through the gateways, every answer checked against in-process
onnxruntime, for the chaos suite.

Two groups of workers run side by side over the same mesh:

- ``raw``: one attempt per query (``NO_RETRY``), so every failure the mesh lets through is seen;
  the suite asks that each is a *retriable* status returned *before* the query's deadline;
- ``sdk``: the SDK's retries (jittered backoff within the deadline) and hedging; the suite asks
  for zero failures.

Each query sends one row of a fixed pool; the answer must equal the reference output of the
version (``meshserve_variant``) that answered it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from meshserve.client import NO_RETRY, MeshClient, MeshError, RetryPolicy

__all__ = ["Load", "Outcome"]

RETRIABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"})


@dataclass(frozen=True, slots=True)
class Outcome:
    group: str  # "raw" or "sdk"
    started: float
    ended: float
    ok: bool
    code: str  # "OK" or the status name
    variant: str
    node: str
    wrong: bool  # answered, but not what the answering version computes
    late: bool  # failed at or after its deadline


class Load:
    """``workers`` threads per group, each sending one query then sleeping ``pause_s``;
    bounded by ``max_queries`` in all and by :meth:`stop` (call it; the suite does)."""

    def __init__(
        self,
        target: str,
        model: str,
        pool: npt.NDArray[np.float32],
        expected: Mapping[str, npt.NDArray[np.float32]],
        *,
        workers: int = 2,
        pause_s: float = 0.02,
        raw_timeout_s: float = 3.0,
        sdk_timeout_s: float = 8.0,
        hedge_after_s: float = 0.3,
        max_queries: int = 200_000,
    ) -> None:
        self.model = model
        self.pool = pool
        self.expected = dict(expected)  # variant -> outputs for every pool row
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause_s = pause_s
        self._max = max_queries
        self._sent = 0
        sdk_policy = RetryPolicy(max_attempts=12, max_backoff_s=0.5, hedge_after_s=hedge_after_s)
        # through the gateways (what the suite checks); an SDK routing itself retries on
        # another copy and falls back to a gateway inside one attempt, so "raw" would not be raw
        self._clients = {
            "raw": (
                MeshClient(target, timeout=raw_timeout_s, retry=NO_RETRY, routing="gateway"),
                raw_timeout_s,
            ),
            "sdk": (
                MeshClient(target, timeout=sdk_timeout_s, retry=sdk_policy, routing="gateway"),
                sdk_timeout_s,
            ),
        }
        self._threads = [
            threading.Thread(target=self._run, args=(group, i), daemon=True, name=f"{group}-{i}")
            for group in self._clients
            for i in range(workers)
        ]

    def expect(self, variant: str, outputs: npt.NDArray[np.float32]) -> None:
        with self._lock:
            self.expected[variant] = outputs

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15.0)
        for client, _ in self._clients.values():
            client.close()

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t]

    def _run(self, group: str, index: int) -> None:
        client, timeout = self._clients[group]
        rng = np.random.default_rng(index + (100 if group == "sdk" else 0))
        while not self._stop.is_set():
            with self._lock:
                if self._sent >= self._max:
                    return
                self._sent += 1
            row = int(rng.integers(len(self.pool)))
            started = time.monotonic()
            outcome = self._one(client, group, row, started, timeout)
            with self._lock:
                self.outcomes.append(outcome)
            self._stop.wait(self._pause_s)

    def _one(
        self, client: MeshClient, group: str, row: int, started: float, timeout: float
    ) -> Outcome:
        try:
            result = client.infer(self.model, {"x": self.pool[row : row + 1]})
        except MeshError as exc:
            ended = time.monotonic()
            code = exc.code.name if isinstance(exc.code, grpc.StatusCode) else str(exc.code)
            late = ended - started >= timeout - 0.05
            return Outcome(group, started, ended, False, code, "", "", False, late)
        ended = time.monotonic()
        with self._lock:
            reference: Any = self.expected.get(result.variant)
        wrong = reference is None or not np.allclose(
            result["y"], reference[row : row + 1], rtol=1e-5, atol=1e-5
        )
        return Outcome(group, started, ended, True, "OK", result.variant, result.node, wrong, False)
