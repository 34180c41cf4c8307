"""Tests for meshserve.node.cache: request digests and the byte-bounded LRU response cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from meshserve.node.cache import ENTRY_OVERHEAD, ResponseCache, cache_key

SHA = "ab" * 32
Inputs = dict[str, NDArray[Any]]


def _inputs() -> Inputs:
    return {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3),
        "y": np.array([1, 2], dtype=np.int64),
    }


def _key(**overrides: Any) -> bytes:
    args: dict[str, Any] = {"model": "m", "variant": "v", "version": SHA, "inputs": _inputs()}
    args.update(overrides)
    return cache_key(**args)


def _flip_byte(i: Inputs) -> Inputs:
    x = i["x"].copy()
    x.view(np.uint8).reshape(-1)[5] ^= 1
    return {**i, "x": x}


CHANGES: dict[str, Callable[[], bytes]] = {
    "model": lambda: _key(model="m2"),
    "variant": lambda: _key(variant="v2"),
    "version": lambda: _key(version="cd" * 32),
    "name": lambda: _key(inputs={"x2": _inputs()["x"], "y": _inputs()["y"]}),
    "dtype": lambda: _key(inputs={**_inputs(), "y": np.array([1, 2], dtype=np.int32)}),
    "shape": lambda: _key(inputs={**_inputs(), "x": _inputs()["x"].reshape(3, 2)}),
    "one_byte": lambda: _key(inputs=_flip_byte(_inputs())),
    "extra_input": lambda: _key(inputs={**_inputs(), "z": np.zeros(0, np.float32)}),
    "concat": lambda: _key(model="mv", variant=""),
}


def test_same_inputs_same_key() -> None:
    assert _key() == _key()
    assert len(_key()) in (20, 32)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_changes_key(change: str) -> None:
    assert CHANGES[change]() != _key()


def test_input_order_and_layout_do_not_matter() -> None:
    i = _inputs()
    assert _key(inputs={"y": i["y"], "x": i["x"]}) == _key()
    fortran = np.asfortranarray(i["x"])
    assert _key(inputs={**i, "x": fortran}) == _key()
    strided = np.arange(12, dtype=np.float32)[::2].reshape(2, 3)
    assert _key(inputs={**i, "x": strided * 0 + i["x"]}) == _key()


def test_bytes_inputs_keyed_unambiguously() -> None:
    a = np.array([b"ab", b"c"], dtype=object)
    b = np.array([b"a", b"bc"], dtype=object)
    assert _key(inputs={"s": a}) == _key(inputs={"s": a.copy()})
    assert _key(inputs={"s": a}) != _key(inputs={"s": b})


def _out(n: int) -> Inputs:
    return {"y": np.zeros(n, dtype=np.uint8)}


def _cost(key: bytes, n: int) -> int:
    return len(key) + ENTRY_OVERHEAD + n


def test_hit_and_miss_counters() -> None:
    cache = ResponseCache(1 << 20)
    key = _key()
    assert cache.get(key) is None
    assert cache.put(key, {"y": np.ones(3)}, model="m", variant="v")
    first, second = cache.get(key), cache.get(key)
    assert first is not None and second is not None
    np.testing.assert_array_equal(second["y"], np.ones(3))
    assert cache.get(CHANGES["one_byte"]()) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2, 2, 1)
    assert stats.bytes == _cost(key, 24)
    assert cache.hit_ratio == 0.5


def test_stored_arrays_are_private_and_read_only() -> None:
    cache = ResponseCache(1 << 20)
    original = np.arange(4, dtype=np.float64)
    cache.put(b"k", {"y": original})
    original[0] = 99.0
    got = cache.get(b"k")
    assert got is not None
    np.testing.assert_array_equal(got["y"], np.arange(4, dtype=np.float64))
    assert not got["y"].flags.writeable
    with pytest.raises(ValueError):
        got["y"][0] = 1.0
    got.pop("y")  # the returned dict is the caller's; the entry is untouched
    again = cache.get(b"k")
    assert again is not None and "y" in again


def test_lru_recently_used_entry_survives() -> None:
    key_size = len(b"a")
    cache = ResponseCache(3 * _cost(b"a", 100))
    for k in (b"a", b"b", b"c"):
        assert cache.put(k, _out(100))
    assert cache.get(b"a") is not None
    assert cache.put(b"d", _out(100))
    assert b"a" in cache and b"b" not in cache and b"c" in cache and b"d" in cache
    assert cache.stats().evictions == 1
    assert cache.stats().bytes == 3 * (key_size + ENTRY_OVERHEAD + 100)


def test_oversize_entry_refused() -> None:
    cache = ResponseCache(_cost(b"k", 100))
    assert cache.put(b"k", _out(100))
    assert not cache.put(b"big", _out(101))
    assert b"k" in cache and b"big" not in cache
    assert not ResponseCache(0).put(b"k", {})


def test_replacing_a_key_does_not_double_count() -> None:
    cache = ResponseCache(1 << 20)
    cache.put(b"k", _out(10))
    cache.put(b"k", _out(30))
    assert cache.stats().bytes == _cost(b"k", 30)
    assert len(cache) == 1


def test_invalidate_by_model_and_variant() -> None:
    cache = ResponseCache(1 << 20)
    cache.put(b"1", _out(1), model="m", variant="a")
    cache.put(b"2", _out(1), model="m", variant="b")
    cache.put(b"3", _out(1), model="other", variant="a")
    assert cache.invalidate("m", "a") == 1
    assert b"1" not in cache and b"2" in cache and b"3" in cache
    assert cache.invalidate("m") == 1
    assert [k for k in (b"1", b"2", b"3") if k in cache] == [b"3"]
    assert cache.stats().bytes == _cost(b"3", 1)


def test_bytes_outputs() -> None:
    cache = ResponseCache(1 << 20)
    out = np.array([b"hello", bytearray(b"xy"), "\u00e9"], dtype=object)
    assert cache.put(b"k", {"s": out})
    assert cache.stats().bytes == _cost(b"k", 5 + 2 + 2)
    got = cache.get(b"k")
    assert got is not None
    assert list(got["s"]) == [b"hello", b"xy", "\u00e9"]
    assert not got["s"].flags.writeable


@settings(max_examples=50, deadline=None)
@given(
    max_bytes=st.integers(0, 2000),
    ops=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 900), st.booleans()), max_size=40),
)
def test_never_exceeds_max_bytes(max_bytes: int, ops: list[tuple[int, int, bool]]) -> None:
    cache = ResponseCache(max_bytes)
    for key_id, size, lookup in ops:
        key = bytes([key_id])
        if lookup:
            cache.get(key)
        else:
            stored = cache.put(key, _out(size))
            assert stored == (_cost(key, size) <= max_bytes)
        stats = cache.stats()
        assert stats.bytes <= max_bytes
        assert stats.entries == len(cache)
