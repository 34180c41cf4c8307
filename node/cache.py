"""Opt-in response cache for a node: identical requests to the same artifact reuse outputs.

Contract:

* :func:`cache_key` is a digest over the model name, variant, version (the artifact sha256) and
  every input in sorted name order (name, dtype, shape, bytes). Every field is length-prefixed,
  so distinct requests can never collide by concatenation; the order of the input mapping does not
  matter. BYTES (object) arrays hash each element's length-prefixed bytes. The inputs are hashed
  once (:func:`inputs_digest`); :func:`key_for` binds that digest to one artifact, so a query
  looked up for several variants hashes its tensors once.
* :class:`ResponseCache` is an LRU bounded in *bytes*: an entry costs the sum of its outputs'
  ``nbytes`` (object arrays: the sum of element lengths) + the key length + :data:`ENTRY_OVERHEAD`.
  ``stats().bytes <= max_bytes`` holds after every operation. An entry larger than ``max_bytes``
  is refused. Stored arrays are private read-only copies; :meth:`ResponseCache.get` returns those
  read-only arrays (in a fresh dict), so no caller can alter a cached response.
* Not thread-safe by design: it is used from the event loop only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["ENTRY_OVERHEAD", "CacheStats", "ResponseCache", "cache_key", "inputs_digest", "key_for"]

ENTRY_OVERHEAD = 64
"""Fixed bytes charged per entry on top of its outputs and key (bookkeeping, not measured)."""

_DIGEST_SIZE = 32


def _element_bytes(element: object) -> bytes:
    if isinstance(element, bytes | bytearray | memoryview):
        return bytes(element)
    if isinstance(element, str):
        return element.encode("utf-8")
    raise TypeError(f"BYTES tensor elements must be bytes or str, got {type(element).__name__}")


def _field(h: hashlib.blake2b, data: bytes | memoryview) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _array_buffer(a: NDArray[Any]) -> bytes | memoryview:
    if a.flags.c_contiguous:
        try:
            return a.data.cast("B")  # no copy
        except (TypeError, ValueError):  # no buffer format (datetime64), or a 0 in the shape
            pass
    return np.ascontiguousarray(a).tobytes()


def inputs_digest(inputs: Mapping[str, NDArray[Any]]) -> bytes:
    """A blake2b digest of every input (name, dtype, shape, bytes) in sorted name order: the
    costly part of a key, computed once per query whatever the variants it is looked up for."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"meshserve-in1")
    h.update(len(inputs).to_bytes(8, "little"))
    for name in sorted(inputs):
        a = inputs[name]
        _field(h, name.encode("utf-8"))
        _field(h, str(a.dtype).encode("utf-8"))
        h.update(len(a.shape).to_bytes(8, "little"))
        for dim in a.shape:
            h.update(int(dim).to_bytes(8, "little"))
        if a.dtype == np.object_:
            h.update(a.size.to_bytes(8, "little"))
            for element in a.flat:
                h.update(b"s" if isinstance(element, str) else b"b")
                _field(h, _element_bytes(element))
        else:
            _field(h, _array_buffer(a))
    return h.digest()


def key_for(model: str, variant: str, version: str, digest: bytes) -> bytes:
    """The cache key of inputs with :func:`inputs_digest` ``digest`` for one artifact."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"meshserve-rc1")
    for text in (model, variant, version):
        _field(h, text.encode("utf-8"))
    _field(h, digest)
    return h.digest()


def cache_key(model: str, variant: str, version: str, inputs: Mapping[str, NDArray[Any]]) -> bytes:
    """Return a blake2b digest identifying this request; see the module docstring."""
    return key_for(model, variant, version, inputs_digest(inputs))


def _array_cost(a: NDArray[Any]) -> int:
    if a.dtype == np.object_:
        return sum(len(_element_bytes(e)) for e in a.flat)
    return int(a.nbytes)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A point-in-time snapshot of a :class:`ResponseCache`."""

    hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int
    max_bytes: int


@dataclass(slots=True)
class _Entry:
    outputs: dict[str, NDArray[Any]]
    size: int
    model: str | None
    variant: str | None


class ResponseCache:
    """Byte-bounded LRU of inference outputs keyed by :func:`cache_key`. Not thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._max = max_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> dict[str, NDArray[Any]] | None:
        """Return the cached (read-only) outputs and mark them most recent, or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return dict(entry.outputs)

    def put(
        self,
        key: bytes,
        outputs: Mapping[str, NDArray[Any]],
        *,
        model: str | None = None,
        variant: str | None = None,
    ) -> bool:
        """Store read-only copies of ``outputs`` under ``key``, tagged for :meth:`invalidate`.

        Returns ``False`` (cache unchanged) when the entry alone exceeds ``max_bytes``; otherwise
        replaces any entry under ``key``, evicts least-recently-used entries until it fits, and
        returns ``True``.
        """
        size = len(key) + ENTRY_OVERHEAD + sum(_array_cost(a) for a in outputs.values())
        if size > self._max:
            return False
        frozen: dict[str, NDArray[Any]] = {}
        for name, a in outputs.items():
            copy = np.array(a, copy=True)
            if copy.dtype == np.object_:  # bytes/str are immutable; freeze mutable buffers
                for i, element in enumerate(copy.flat):
                    if isinstance(element, bytearray | memoryview):
                        copy.flat[i] = bytes(element)
            copy.flags.writeable = False
            frozen[name] = copy
        self._remove(key)
        while self._entries and self._bytes + size > self._max:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.size
            self._evictions += 1
        self._entries[key] = _Entry(frozen, size, model, variant)
        self._bytes += size
        return True

    def invalidate(self, model: str, variant: str | None = None) -> int:
        """Drop entries tagged with ``model`` (and ``variant``, if given); return how many."""
        doomed = [
            key
            for key, e in self._entries.items()
            if e.model == model and (variant is None or e.variant == variant)
        ]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def clear(self) -> None:
        """Drop every entry; counters are kept."""
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            entries=len(self._entries),
            bytes=self._bytes,
            evictions=self._evictions,
            max_bytes=self._max,
        )

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        lookups = self._hits + self._misses
        return self._hits / lookups if lookups else 0.0

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
