"""meshserve.controlplane.etcd primitives against a real etcd (one fresh server per test)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from meshserve.controlplane.etcd import (
    Election,
    PrefixMirror,
    Session,
    SessionLostError,
    connect,
    parse_url,
)
from tests.support.etcd import EtcdServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

REPO_ROOT = Path(__file__).resolve().parents[2]


async def retry(op: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """Run ``op`` until it succeeds (etcd may be coming back up)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await op()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def snapshot(client: Any, prefix: str) -> dict[str, bytes]:
    return {kv.key.decode(): kv.value for kv in await client.get_prefix(prefix.encode())}


async def wait_until_absent(client: Any, key: bytes, within: float) -> float:
    """Seconds until ``key`` disappears; fails after ``within``."""
    start = time.monotonic()
    while await client.get(key) is not None:
        assert time.monotonic() - start < within, f"{key!r} still present after {within}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


# -- connect ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:2379", ("127.0.0.1", 2379)),
        ("http://localhost:12345/", ("localhost", 12345)),
        ("127.0.0.1:4001", ("127.0.0.1", 4001)),
        ("etcd", ("etcd", 2379)),
        ("http://[::1]:2379", ("::1", 2379)),
    ],
)
def test_parse_url(url: str, expected: tuple[str, int]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["", "https://h:1", "unix:///x", "http://h:1/path", "http://:1", "http://h:99999", "h:x"],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


async def test_connect_unreachable_is_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ConnectionError):
        await connect(f"127.0.0.1:{port}", timeout=1.0)


# -- Session ------------------------------------------------------------------------


async def test_session_keeps_lease_alive_then_close_revokes(client: Any) -> None:
    session = await Session.open(client, ttl=2)
    assert session.ttl == 2
    await client.put(b"/t/session/alive", b"1", lease=session.lease_id)
    await asyncio.sleep(3 * session.ttl + 0.5)
    assert await client.get(b"/t/session/alive") is not None
    assert not session.done.is_set()
    await session.close()
    assert session.done.is_set() and not session.lost
    assert await client.get(b"/t/session/alive") is None  # revoked, not expired
    await session.close()  # idempotent


async def test_session_done_when_lease_revoked_elsewhere(client: Any) -> None:
    async with await Session.open(client, ttl=2) as session:
        await client.revoke_lease(session.lease_id)
        await asyncio.wait_for(session.done.wait(), timeout=session.ttl)
        assert session.lost


async def test_session_without_revoke_expires_by_ttl(client: Any) -> None:
    session = await Session.open(client, ttl=2)
    await client.put(b"/t/session/norevoke", b"1", lease=session.lease_id)
    await session.close(revoke=False)
    assert await client.get(b"/t/session/norevoke") is not None
    assert await wait_until_absent(client, b"/t/session/norevoke", session.ttl + 1) > 0.5


_CRASHING_OWNER = """
import asyncio, sys
from meshserve.controlplane.etcd import Session, connect

async def main() -> None:
    client = await connect(sys.argv[1])
    session = await Session.open(client, ttl=2)
    await client.put(sys.argv[2].encode(), b"alive", lease=session.lease_id)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_session_key_expires_when_owner_process_is_killed(
    etcd: EtcdServer, client: Any
) -> None:
    """The real failure mode: the process holding the session dies (SIGKILL)."""
    key = b"/t/session/crash"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_OWNER, etcd.url, key.decode(),
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        assert line.strip() == b"ready"
        await asyncio.sleep(1.5)  # a few keep-alive rounds: the key stays
        assert await client.get(key) is not None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        gone_after = await wait_until_absent(client, key, within=2 + 1)
        assert gone_after > 0.5  # expired by TTL, not removed by anyone
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_session_survives_etcd_restart(etcd: EtcdServer, client: Any) -> None:
    """Failed refreshes while etcd restarts are retried; etcd keeps the lease."""
    async with await Session.open(client, ttl=5) as session:
        await client.put(b"/t/session/restart", b"1", lease=session.lease_id)
        await asyncio.to_thread(etcd.restart)
        await asyncio.sleep(session.ttl / 3 + 0.5)  # at least one refresh after restart
        assert not session.done.is_set()
        assert await retry(lambda: client.get(b"/t/session/restart")) is not None


# -- PrefixMirror ---------------------------------------------------------------------


async def test_mirror_initial_load_puts_deletes_and_subscribers(client: Any) -> None:
    await client.put(b"/t/m/a", b"1")
    await client.put(b"/t/m/b", b"2")
    await client.put(b"/t/other", b"x")
    mirror = PrefixMirror(client, "/t/m/")
    await mirror.start()
    try:
        assert dict(mirror.items()) == {"/t/m/a": b"1", "/t/m/b": b"2"}
        start_rev = mirror.revision
        assert start_rev >= 3
        calls: list[Mapping[str, bytes]] = []
        unsubscribe = mirror.subscribe(lambda: calls.append(mirror.items()))

        await client.put(b"/t/m/c", b"3")
        await client.delete(b"/t/m/a")
        await client.put(b"/t/m/b", b"22")
        await client.put(b"/t/other", b"y")  # outside the prefix
        expected = {"/t/m/b": b"22", "/t/m/c": b"3"}
        assert dict(await mirror.wait_for(lambda m: dict(m) == expected, timeout=5)) == expected
        assert mirror.revision == start_rev + 3
        assert calls and dict(calls[-1]) == expected

        # a transaction's events form one batch: subscribers never see half of it
        tx = client.transactions
        seen: list[dict[str, bytes]] = []
        mirror.subscribe(lambda: seen.append(dict(mirror.items())))
        await client.transaction(
            compare=[],
            success=[tx.put(b"/t/m/x", b"1"), tx.put(b"/t/m/y", b"1"), tx.delete(b"/t/m/c")],
            failure=[],
        )
        await mirror.wait_for(lambda m: "/t/m/y" in m, timeout=5)
        assert all(("/t/m/x" in s) == ("/t/m/y" in s) == ("/t/m/c" not in s) for s in seen)

        unsubscribe()
        n = len(calls)
        await client.put(b"/t/m/d", b"4")
        await mirror.wait_for(lambda m: "/t/m/d" in m, timeout=5)
        assert len(calls) == n
        with pytest.raises(TimeoutError):
            await mirror.wait_for(lambda m: "/t/m/never" in m, timeout=0.2)
        assert mirror.reloads == 0
    finally:
        await mirror.close()
    await mirror.close()  # idempotent


async def test_mirror_journal_names_the_keys_changed_since_a_cursor(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("meshserve.controlplane.etcd.watch.JOURNAL", 4)
    await client.put(b"/t/j/a", b"1")
    mirror = PrefixMirror(client, "/t/j/")
    await mirror.start()
    try:
        cursor, keys_ = mirror.changes_since(-1)
        assert keys_ is None  # a first call: read everything
        assert mirror.changes_since(cursor) == (cursor, frozenset())
        await client.put(b"/t/j/b", b"2")
        await client.delete(b"/t/j/a")
        await mirror.wait_for(lambda m: "/t/j/a" not in m, timeout=5)
        cursor, keys_ = mirror.changes_since(cursor)
        assert keys_ == {"/t/j/a", "/t/j/b"}
        for i in range(6):  # more changes than the journal holds
            await client.put(f"/t/j/k{i}".encode(), b"x")
        await mirror.wait_for(lambda m: "/t/j/k5" in m, timeout=5)
        late, keys_ = mirror.changes_since(cursor)
        assert keys_ is None  # the journal does not reach back: read everything
        assert mirror.changes_since(late - 2)[1] == {"/t/j/k4", "/t/j/k5"}
        await mirror.reload()
        assert mirror.changes_since(late)[1] is None  # read again in full since
    finally:
        await mirror.close()


def _gateway_put(url: str, key: str, value: bytes) -> None:
    """Blocking put through etcd's JSON gateway (no asyncio involved)."""
    body = {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(value).decode(),
    }
    request = urllib.request.Request(f"{url}/v3/kv/put", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def _restart_and_write_with_loop_frozen(etcd: EtcdServer, writes: dict[str, bytes]) -> None:
    """Called *on* the event-loop thread, on purpose: while it runs no task can, so the
    mirror cannot re-create its watch before these post-restart writes land."""
    etcd.restart()
    for key, value in writes.items():
        _gateway_put(etcd.url, key, value)


async def test_mirror_resumes_across_etcd_restart_without_losing_events(
    etcd: EtcdServer, client: Any
) -> None:
    prefix = "/t/r/"
    for i in range(5):
        await client.put(f"{prefix}before-{i}".encode(), b"v")
    mirror = PrefixMirror(client, prefix)
    await mirror.start()
    try:
        for i in range(5, 10):  # written while the watch is live
            await client.put(f"{prefix}before-{i}".encode(), b"v")
        await mirror.wait_for(lambda m: len(m) == 10, timeout=5)
        revision_before = mirror.revision

        frozen_writes = {f"{prefix}during-{i}": str(i).encode() for i in range(5)}
        _restart_and_write_with_loop_frozen(etcd, frozen_writes)
        # more writes while the mirror is reconnecting (the client reconnects too)
        for i in range(5):
            await retry(lambda i=i: client.put(f"{prefix}after-{i}".encode(), str(i).encode()))
        await client.delete(f"{prefix}before-0".encode())
        await client.put(f"{prefix}before-1".encode(), b"changed")

        truth = await snapshot(client, prefix)
        assert len(truth) == 19
        await mirror.wait_for(lambda m: dict(m) == truth, timeout=8)
        truth_rev = (await client.get_prefix(prefix.encode())).header.revision
        assert mirror.revision == truth_rev == revision_before + 12
        assert mirror.reconnects >= 1  # the watch really broke and came back
        assert mirror.reloads == 0  # resumed from its revision, no full reload
        assert mirror.watching

        await client.put(f"{prefix}late".encode(), b"1")  # and it keeps following
        await mirror.wait_for(lambda m: f"{prefix}late" in m, timeout=5)
    finally:
        await mirror.close()


class _CompactingMirror(PrefixMirror):
    """Runs ``hook`` right after the initial load, before the watch is created."""

    hook: Callable[[], Awaitable[None]] | None = None

    async def _load(self) -> None:
        await super()._load()
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()


async def test_mirror_reloads_after_compaction(client: Any) -> None:
    await client.put(b"/t/c/a", b"1")
    mirror = _CompactingMirror(client, "/t/c/")
    notified = asyncio.Event()

    async def change_and_compact() -> None:
        await client.delete(b"/t/c/a")
        await client.put(b"/t/c/b", b"2")
        for i in range(3):
            await client.put(b"/t/elsewhere", str(i).encode())
        await client.compact((await client.get_prefix(b"/t/")).header.revision)

    mirror.hook = change_and_compact
    mirror.subscribe(notified.set)
    await mirror.start()
    try:
        assert dict(mirror.items()) == {"/t/c/a": b"1"}  # the stale initial load
        await mirror.wait_for(lambda m: dict(m) == {"/t/c/b": b"2"}, timeout=5)
        assert mirror.reloads == 1 and notified.is_set()
        await client.put(b"/t/c/c", b"3")
        await mirror.wait_for(lambda m: "/t/c/c" in m, timeout=5)
    finally:
        await mirror.close()


# -- Election -------------------------------------------------------------------------


async def _first_leader(*campaigns: asyncio.Task[None]) -> int:
    done, _ = await asyncio.wait(campaigns, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    return campaigns.index(done.pop())


async def test_election_single_leader_and_failover_on_session_close(client: Any) -> None:
    s1, s2 = await Session.open(client, ttl=2), await Session.open(client, ttl=2)
    e1 = Election(client, s1, "/t/leader", "node-1")
    e2 = Election(client, s2, "/t/leader", "node-2")
    tasks = (asyncio.create_task(e1.campaign()), asyncio.create_task(e2.campaign()))
    try:
        winner = await _first_leader(*tasks)
        elections, sessions = (e1, e2), (s1, s2)
        leader, follower = elections[winner], elections[1 - winner]
        await asyncio.sleep(0.5)
        assert leader.is_leader and not follower.is_leader
        assert not tasks[1 - winner].done()
        assert await follower.leader() == leader.value

        start = time.monotonic()
        await sessions[winner].close()  # revokes: the key goes at once
        assert not leader.is_leader
        await asyncio.wait_for(tasks[1 - winner], timeout=2)
        assert time.monotonic() - start < 2
        assert follower.is_leader
        assert await leader.leader() == follower.value
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        await s1.close()
        await s2.close()


async def test_election_resign_hands_over(client: Any) -> None:
    async with (
        await Session.open(client, ttl=2) as s1,
        await Session.open(client, ttl=2) as s2,
    ):
        e1 = Election(client, s1, "/t/leader", "node-1")
        e2 = Election(client, s2, "/t/leader", "node-2")
        await e1.campaign()
        assert e1.is_leader and e1.revision > 0
        await e1.campaign()  # already leader: no-op
        t2 = asyncio.create_task(e2.campaign())
        await asyncio.sleep(0.3)
        assert not t2.done()
        await e1.resign()
        assert not e1.is_leader and e1.revision == 0
        await asyncio.wait_for(t2, timeout=2)
        assert e2.is_leader and await e2.leader() == "node-2"
        await e1.resign()  # not leader: no-op, must not touch e2's key
        assert await e2.leader() == "node-2"
        await e2.resign()
        assert await e2.leader() is None


async def test_cancelled_campaign_leaves_nothing_behind(client: Any) -> None:
    async with (
        await Session.open(client, ttl=5) as s1,
        await Session.open(client, ttl=5) as s2,
    ):
        e1 = Election(client, s1, "/t/leader", "node-1")
        e2 = Election(client, s2, "/t/leader", "node-2")
        await e1.campaign()
        t2 = asyncio.create_task(e2.campaign())
        await asyncio.sleep(0.3)  # e2 is now waiting on the watch
        t2.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert not e2.is_leader
        await e1.resign()
        assert await client.get(b"/t/leader") is None
        info = await client.get_lease_info(s2.lease_id)
        assert list(info.keys) == []

        # cancel at random points of an uncontested campaign (mid-transaction included)
        for i in range(25):
            task = asyncio.create_task(e2.campaign())
            await asyncio.sleep((i % 5) * 0.001)
            task.cancel()
            await asyncio.wait({task})
            if task.cancelled():
                assert await client.get(b"/t/leader") is None, f"leftover at round {i}"
                assert not e2.is_leader
            else:
                assert e2.is_leader
                await e2.resign()


async def test_campaign_fails_when_session_ends(client: Any) -> None:
    async with (
        await Session.open(client, ttl=2) as s1,
        await Session.open(client, ttl=2) as s2,
    ):
        await Election(client, s1, "/t/leader", "node-1").campaign()
        e2 = Election(client, s2, "/t/leader", "node-2")
        t2 = asyncio.create_task(e2.campaign())
        await asyncio.sleep(0.2)
        await s2.close()
        with pytest.raises(SessionLostError):
            await asyncio.wait_for(t2, timeout=2)
        with pytest.raises(SessionLostError):
            await e2.campaign()
