"""The embedded member: models run in the application process, the process a member of the mesh.

Imported only when a client names embedded models (it brings the node's runtime and
onnxruntime). It reuses the node's parts rather than copying them:

* the link: :class:`~meshserve.node.agent.Agent` and its
  :class:`~meshserve.node.link.Link` (outbound streams to every replica, reconnect with
  backoff, the bounded telemetry budget, on-change telemetry and the bounded offline buffer
  delivered first on reconnect); the Hello says kind ``embedded`` and names the models, so the
  control plane never places onto the member and tells it, instead, the variants of the version
  each model's alias points at (``controlplane/link/embedded.py``);
* the copies: :class:`~meshserve.node.copies.CopyManager` (sha256-verified fetch into the
  :class:`~meshserve.node.store.ModelStore`, warm-up, latency profile, drift sketches);
* monitoring: :class:`~meshserve.node.monitor.PredictionLog` (feedback joins by request id).

Contract:

* Everything asynchronous runs on one event loop on the member's own thread (started by
  :meth:`Member.start`, stopped by :meth:`Member.close`: links closed, copies unloaded, log
  closed, awaited there). :meth:`Member.infer` runs on the caller's thread: it looks up the
  copy to use in a table the loop replaces on every copy change (never mutated in place), runs
  onnxruntime directly (no thread hand-off) and keeps the accounting (in-flight, counters,
  latency, drift sketch, prediction log) under one lock that the telemetry summary and the
  feedback join take too.
* Which copy answers: the newest version the control plane named (the version of its latest
  Load of the model) once one of its variants is READY, else the READY copies of the version
  held before, so a rollout or rollback swaps at the moment the new copy is warm and no call
  fails; among that version's variants, the most accurate, or with ``slo_ms`` /
  ``min_accuracy`` the choice of :class:`~meshserve.common.routing.switching.Switcher` from the
  member's own measured profiles (no transport). ``version`` pins a variant or a version that
  is held.
* Autonomy: every Load applied is recorded in ``<cache_dir>/embedded.json`` (written
  atomically); at start the member loads those first, from the verified artifacts in its cache,
  so it serves while no control plane answers; the control plane's Hello adoption then believes
  them (same sha256) or replaces them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from meshserve.client._embedded import EmbeddedModel, EmbeddedOptions, EmbeddedStatus
from meshserve.common.datatypes import datatype_of
from meshserve.common.errors import NotFound, StatusError, Unavailable
from meshserve.common.routing.switching import CopyLoad, Switcher, VariantOption
from meshserve.common.security import TLSFiles
from meshserve.common.tenancy import current_tenant
from meshserve.node.agent import Agent
from meshserve.node.copies import CopyManager
from meshserve.node.copy_entry import CopyEntry
from meshserve.node.monitor import PredictionLog, monitor_answer
from meshserve.node.service import InferenceHandler
from meshserve.node.store import ModelStore
from meshserve.node.transfer import SourcePolicy
from meshserve.protos import mesh_pb2

__all__ = ["EMBEDDED", "Member", "Served", "serving_table"]

_log = logging.getLogger("meshserve.client.embedded")

EMBEDDED = "embedded"  # Hello.kind (controlplane.snapshot.EMBEDDED)
_MANIFEST = "embedded.json"


@dataclass(frozen=True, slots=True)
class Served:
    """One model's serving choice, as the loop last computed it (immutable)."""

    version: str
    entries: tuple[CopyEntry, ...]  # READY copies of ``version``, most accurate first
    specs: tuple[mesh_pb2.ModelSpec, ...]  # their variant and accuracy (switching's options)
    held: Mapping[str, CopyEntry]  # every READY copy of the model, by variant and by version


def serving_table(
    entries: Sequence[CopyEntry],
    versions: Mapping[tuple[str, str], tuple[str, float, int]],
    targets: Mapping[str, str],
) -> dict[str, Served]:
    """Which copies answer each model (pure; see the module contract). ``versions``: per
    (model, variant) its version, accuracy and load order; ``targets``: the version of the
    latest Load per model."""
    by_model: dict[str, dict[str, list[CopyEntry]]] = {}
    for e in entries:
        if e.state != mesh_pb2.READY or e.copy is None:
            continue
        version = versions.get((e.model, e.variant), ("", 0.0, 0))[0]
        by_model.setdefault(e.model, {}).setdefault(version, []).append(e)
    out: dict[str, Served] = {}
    for model, groups in by_model.items():
        target = targets.get(model, "")
        if target not in groups:  # the newest version ready: the latest loaded copy's
            target = max(
                groups,
                key=lambda v: max(
                    versions.get((e.model, e.variant), ("", 0, 0))[2] for e in groups[v]
                ),
            )

        def accuracy(e: CopyEntry) -> float:
            return versions.get((e.model, e.variant), ("", 0.0, 0))[1]

        chosen = sorted(groups[target], key=lambda e: (-accuracy(e), e.variant))
        held: dict[str, CopyEntry] = {}
        for version, copies in groups.items():
            best = sorted(copies, key=lambda e: (-accuracy(e), e.variant))
            held.setdefault(version, best[0])
            for e in copies:
                held[e.variant] = e
        out[model] = Served(
            target,
            tuple(chosen),
            tuple(
                mesh_pb2.ModelSpec(name=model, variant=e.variant, accuracy=accuracy(e))
                for e in chosen
            ),
            held,
        )
    return out


class _MemberCopies(CopyManager):
    """The node's copy manager, plus what the member must remember of each Load: the version
    and accuracy of each variant, the latest version named per model, and the manifest."""

    def __init__(self, *args: Any, manifest: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.manifest = manifest
        self.versions: dict[tuple[str, str], tuple[str, float, int]] = {}
        self.targets: dict[str, str] = {}
        self.commands: dict[tuple[str, str], mesh_pb2.LoadModel] = {}
        self._order = itertools.count(1)

    def load(self, cmd: mesh_pb2.LoadModel) -> None:
        key = (cmd.model, cmd.variant)
        version = cmd.version or "default"  # a model that never names versions has one
        self.versions[key] = (version, cmd.accuracy, next(self._order))
        self.targets[cmd.model] = version
        self.commands.pop(key, None)  # the manifest lists Loads oldest first: restored in order
        self.commands[key] = cmd
        self._save()
        super().load(cmd)

    async def unload(
        self, model: str, variant: str, placement_revision: int = 0, store_id: str = ""
    ) -> None:
        if self.commands.pop((model, variant), None) is not None:
            self._save()
        await super().unload(model, variant, placement_revision, store_id)

    def restore(self) -> int:
        """Load what the manifest records (the versions last served); returns how many."""
        try:
            data = json.loads(self.manifest.read_text())
            commands = [
                mesh_pb2.LoadModel.FromString(base64.b64decode(text))
                for text in data.get("loads", [])
            ]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            _log.warning("ignoring the embedded manifest %s: %r", self.manifest, exc)
            return 0
        for cmd in commands:
            _log.info(
                "serving %s/%s (%s) from the local cache", cmd.model, cmd.variant, cmd.version
            )
            self.load(cmd)
        return len(commands)

    def _save(self) -> None:
        loads = [base64.b64encode(c.SerializeToString()).decode() for c in self.commands.values()]
        tmp = self.manifest.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"loads": loads}))
            os.replace(tmp, self.manifest)
        except OSError as exc:
            _log.warning("cannot record the embedded manifest %s: %r", self.manifest, exc)


class _MemberAgent(Agent):
    """The node's agent, saying kind ``embedded`` and the models; the summary and the feedback
    join take the member's accounting lock (the application's threads write what they read)."""

    def __init__(
        self, *, wants: Sequence[EmbeddedModel], lock: threading.Lock, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._wants = [
            mesh_pb2.EmbeddedModel(model=w.model, version=w.version, alias=w.alias) for w in wants
        ]
        self._lock = lock

    def hello(self) -> mesh_pb2.Hello:
        hello = super().hello()
        hello.kind = EMBEDDED
        hello.embedded.extend(self._wants)
        return hello

    def summarise(
        self, windows_sent: dict[tuple[str, str], int] | None = None
    ) -> mesh_pb2.Telemetry:
        with self._lock:
            return super().summarise(windows_sent)

    def join_feedback(self, batch: mesh_pb2.FeedbackBatch) -> int:
        with self._lock:
            return super().join_feedback(batch)


class Member:
    """One embedded member (see the module contract)."""

    def __init__(
        self,
        *,
        seeds: Sequence[str],
        wants: Sequence[EmbeddedModel],
        options: EmbeddedOptions,
        tls: TLSFiles | None,
        max_message_bytes: int,
    ) -> None:
        self.member_id = options.member_id
        self.wants = {w.model: w for w in wants}
        self._seeds = list(seeds)
        self._options = options
        self._tls = tls
        self._max_message_bytes = max_message_bytes
        self._lock = threading.Lock()  # the accounting (see the module contract)
        self._changed = threading.Condition()  # notified when the serving table changes
        self._table: dict[str, Served] = {}
        self._switcher = Switcher(transport_s=0.0)
        self._thread = threading.Thread(target=self._thread_main, name="meshserve-member")
        self._thread.daemon = True
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.copies: _MemberCopies | None = None
        self.agent: _MemberAgent | None = None

    # -- lifecycle (one place) ---------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise Unavailable(f"embedded member {self.member_id} did not start in {timeout_s} s")
        if self._failure is not None:
            raise Unavailable(f"embedded member {self.member_id} failed to start: {self._failure}")

    def close(self, timeout_s: float = 15.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended already
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); the thread ends
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        opts = self._options
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cache = Path(opts.cache_dir)
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
        files = 4
        log = PredictionLog(
            cache / "predictions",
            max_file_bytes=max(1 << 16, opts.prediction_log_max_bytes // files),
            max_files=files,
        )
        await asyncio.to_thread(log.open)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, opts.workers), thread_name_prefix="member-ort"
        )
        roots = None if opts.artifact_roots is None else tuple(map(Path, opts.artifact_roots))
        copies = _MemberCopies(
            ModelStore(cache / "artifacts", sources=SourcePolicy(file_roots=roots)),
            executor,
            batch_concurrency=max(1, opts.workers),
            prediction_log=log,
            manifest=cache / _MANIFEST,
        )
        self.copies = copies
        unsubscribe = copies.subscribe(lambda _: self._refresh())
        agent = _MemberAgent(
            wants=list(self.wants.values()),
            lock=self._lock,
            node_id=self.member_id,
            labels=dict(opts.labels),
            direct_address="",
            seeds=self._seeds,
            copies=copies,
            handler=InferenceHandler(self.member_id, copies),  # never sent a query
            max_message_bytes=self._max_message_bytes,
            keepalive_ms=opts.keepalive_ms,
            telemetry_max_bytes_per_s=opts.telemetry_max_bytes_per_s,
            telemetry_buffer_bytes=opts.telemetry_buffer_bytes,
            telemetry_heartbeat_s=opts.telemetry_heartbeat_s,
            tls=self._tls,
            join_token=opts.join_token,
            insecure_join=opts.insecure_join,
        )
        self.agent = agent
        try:
            copies.restore()
            agent.start()
            self._ready.set()
            while not self._stop.is_set():  # logged predictions reach the file within ~1 s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                with self._lock:
                    log.flush()
        finally:
            unsubscribe()
            await agent.close()
            await copies.close()
            with self._lock:
                log.close()
            await asyncio.to_thread(executor.shutdown, True)

    def _refresh(self) -> None:
        """A copy changed (on the loop): recompute the serving table, wake waiting callers."""
        copies = self.copies
        if copies is None:
            return
        table = serving_table(copies.entries(), copies.versions, copies.targets)
        with self._changed:
            self._table = table
            self._changed.notify_all()

    # -- the query path (the caller's thread) ------------------------------------------------

    def _served(self, model: str, deadline: float) -> Served:
        served = self._table.get(model)
        if served is not None and served.entries:
            return served
        with self._changed:
            while True:
                served = self._table.get(model)
                if served is not None and served.entries:
                    return served
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise Unavailable(self._not_ready(model))
                self._changed.wait(min(left, 0.5))

    def _not_ready(self, model: str) -> str:
        copies = self.copies
        states = (
            ", ".join(
                f"{e.variant} {mesh_pb2.CopyState.Name(e.state)}"  # type: ignore[arg-type]
                for e in copies.entries()
                if e.model == model
            )
            if copies is not None
            else ""
        )
        states = states or "nothing loaded: is it registered, the control plane reachable?"
        return f"embedded model {model!r} has no copy ready in this process yet ({states})"

    def pick(
        self,
        model: str,
        version: str,
        slo_ms: float | None,
        min_accuracy: float | None,
        deadline: float,
    ) -> CopyEntry:
        """The copy that answers (see the module contract)."""
        served = self._served(model, deadline)
        if version:
            entry = served.held.get(version)
            if entry is None:
                raise NotFound(
                    f"embedded model {model!r} holds no version or variant {version!r} "
                    f"(serving {served.version}: {', '.join(e.variant for e in served.entries)})"
                )
            return entry
        if (slo_ms is None and min_accuracy is None) or len(served.entries) == 1:
            if min_accuracy is not None:
                self._switcher.choose(model, self._options_of(served), None, min_accuracy)
            return served.entries[0]
        choice = self._switcher.choose(
            model,
            self._options_of(served),
            slo_ms / 1000.0 if slo_ms is not None else None,
            min_accuracy,
            version=served.version,
        )
        return next(e for e in served.entries if e.variant == choice.spec.variant)

    def _options_of(self, served: Served) -> list[VariantOption]:
        workers = max(1, self._options.workers)
        return [
            VariantOption(
                spec,
                [CopyLoad(self.member_id, dict(e.latency_profile), e.in_flight, False, 1, workers)],
            )
            for spec, e in zip(served.specs, served.entries, strict=True)
        ]

    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] | None,
        *,
        version: str,
        slo_ms: float | None,
        min_accuracy: float | None,
        request_id: str,
        timeout: float,
    ) -> tuple[dict[str, npt.NDArray[Any]], str, str]:
        """Answer one query in this thread: (outputs, variant, request id). Raises the
        :class:`StatusError` the mesh would (InvalidArgument for inputs that do not fit the
        model, Unavailable while nothing is loaded, NotFound for a version not held)."""
        deadline = time.monotonic() + timeout
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        for _ in range(3):  # a copy retired between the lookup and the run: look again
            entry = self.pick(model, version, slo_ms, min_accuracy, deadline)
            copy = entry.copy
            if copy is not None:
                break
            self._refresh_soon()
        else:
            raise Unavailable(f"embedded model {model!r} is being replaced; retry")
        copy.validate(arrays, {name: datatype_of(a) for name, a in arrays.items()})
        names = copy.output_names(list(outputs or ()))
        lock = self._lock
        with lock:
            entry.in_flight += 1
            entry.requests += 1
        started = time.monotonic()
        answered = False
        try:
            result = copy.run_blocking(arrays, names)
            answered = True
        except StatusError:
            raise
        except Exception as exc:  # onnxruntime's own untyped errors
            raise StatusError(
                f"embedded model {model!r} failed: {exc}", grpc.StatusCode.INTERNAL
            ) from exc
        finally:
            if not answered:
                with lock:
                    entry.in_flight -= 1
                    entry.errors += 1
        elapsed = time.monotonic() - started
        with lock:
            entry.in_flight -= 1
            entry.latency.record(elapsed, started + elapsed)
            request_id = self._monitor(entry, request_id, arrays, result)
        return result, entry.variant, request_id

    def _monitor(
        self,
        entry: CopyEntry,
        request_id: str,
        inputs: dict[str, npt.NDArray[Any]],
        outputs: dict[str, npt.NDArray[Any]],
    ) -> str:
        """As the node's handler (:func:`~meshserve.node.monitor.monitor_answer`; under the
        lock)."""
        copies = self.copies
        log = copies.prediction_log if copies is not None else None
        return monitor_answer(
            entry.monitor, log, request_id, inputs, outputs, self.member_id, current_tenant()
        )

    def _refresh_soon(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._refresh)
        time.sleep(0.001)

    def inline(self, model: str) -> bool:
        """Whether ``model``'s copy is fast enough to run on an event loop (async clients)."""
        served = self._table.get(model)
        return served is not None and bool(served.entries) and served.entries[0].inline

    def status(self) -> EmbeddedStatus:
        agent = self.agent
        links = list(agent.links.values()) if agent is not None else []
        return EmbeddedStatus(
            member_id=self.member_id,
            linked=len(agent.connected_replicas()) if agent is not None else 0,
            buffered=len(agent.offline) if agent is not None else 0,
            telemetry_bytes_sent=sum(link.telemetry_bytes_sent for link in links),
            serving={
                model: (s.version, tuple(e.variant for e in s.entries))
                for model, s in dict(self._table).items()
            },
        )
