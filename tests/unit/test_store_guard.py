"""The judgements behind issue 14 §5: was the etcd store replaced (controlplane/etcd/guard.py),
how far to compact it, and the hub's unload safety floor (controlplane/link/reconcile.py, its
episodes in controlplane/link/floor.py, with a fake clock)."""

from __future__ import annotations

import pytest

from meshserve.controlplane.etcd._client import EtcdStatus
from meshserve.controlplane.etcd.guard import StoreGuard, compaction_target, store_replaced
from meshserve.controlplane.link.floor import UnloadFloor
from meshserve.controlplane.link.reconcile import exceeds_unload_floor


def _status(cluster_id: int = 7, revision: int = 100) -> EtcdStatus:
    return EtcdStatus(
        cluster_id=cluster_id,
        member_id=1,
        revision=revision,
        raft_term=2,
        db_size=1 << 20,
        db_size_in_use=1 << 19,
    )


@pytest.mark.parametrize(
    ("case", "known", "seen", "status", "why"),
    [
        ("first look at a store: never a replacement", 0, 0, _status(7, 5), None),
        ("same cluster, revision moved on", 7, 90, _status(7, 100), None),
        ("same cluster, the revision the mirrors applied", 7, 100, _status(7, 100), None),
        ("data directory lost: revision restarts low", 7, 5000, _status(7, 12), "backwards"),
        ("another cluster on the same address", 7, 50, _status(9, 100), "cluster id"),
        ("first look but mirrors ahead (restored backup)", 0, 300, _status(7, 20), "backwards"),
    ],
)
def test_store_replaced(
    case: str, known: int, seen: int, status: EtcdStatus, why: str | None
) -> None:
    got = store_replaced(known, seen, status)
    if why is None:
        assert got is None, case
    else:
        assert got is not None and why in got, case


@pytest.mark.parametrize(
    ("revision", "compacted", "keep", "min_step", "want"),
    [
        (500, 0, 1000, 100, None),  # less history than we keep: nothing
        (1000, 0, 1000, 100, None),  # exactly the history we keep
        (1200, 0, 1000, 100, 200),  # 200 revisions beyond: compact them
        (1250, 200, 1000, 100, None),  # only 50 more since the last compaction
        (1300, 200, 1000, 100, 300),  # a step's worth more
        (10**6, 0, 10_000, 1000, 990_000),  # a long-running mesh: one big step
    ],
)
def test_compaction_target(
    revision: int, compacted: int, keep: int, min_step: int, want: int | None
) -> None:
    assert compaction_target(revision, compacted, keep=keep, min_step=min_step) == want


@pytest.mark.parametrize(
    ("case", "unloads", "held", "exceeds"),
    [
        ("nothing to unload", 0, 10, False),
        ("one copy moves", 1, 10, False),
        ("a 2-copy model removed from a small mesh", 2, 2, False),
        ("half of the mesh", 5, 10, False),
        ("more than half of the mesh", 6, 10, True),
        ("an empty view: every copy of a 4-copy mesh", 4, 4, True),
        ("an empty view: every copy of a large mesh", 1000, 1000, True),
        ("three of many", 3, 100, False),
    ],
)
def test_unload_floor(case: str, unloads: int, held: int, exceeds: bool) -> None:
    assert exceeds_unload_floor(unloads, held) is exceeds, case


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unload_floor_episode_holds_until_no_unload_or_confirmed() -> None:
    """controlplane/link/floor.py: one alarm per episode; every Unload held during it; a smaller
    count (lost models registered one by one) does not end it; no Unload at all does; a view
    that keeps asking past the confirmation period is obeyed."""
    clock, alarms = _Clock(), list[str]()
    floor = UnloadFloor(600.0, alarms.append, clock=clock)
    floor.judge(1, 10)  # a copy moves: no episode
    assert not floor.holding() and alarms == []
    floor.judge(4, 4)  # the view emptied
    assert floor.holding() and len(alarms) == 1 and "4 of the 4 copies" in alarms[0]
    floor.judge(2, 4)  # one model registered again: the rest stays held
    floor.judge(4, 4)
    assert floor.holding() and len(alarms) == 1
    floor.judge(0, 4)  # every model back: released
    assert not floor.holding()
    floor.judge(4, 4)  # a new episode, a new alarm
    assert floor.holding() and len(alarms) == 2
    clock.now += 601.0  # confirmed by time: unloads flow
    assert not floor.holding()
    floor.judge(4, 4)
    assert not floor.holding() and len(alarms) == 2


@pytest.mark.parametrize(
    ("case", "steps", "holding", "released"),
    [
        ("a confirmation releases the held episode", ["judge 4/4", "confirm c1"], False, 4),
        ("no episode: nothing to release", ["confirm c1"], False, 0),
        ("a small unload is no episode", ["judge 1/10", "confirm c1"], False, 0),
        (
            "one written before the episode does not pre-confirm it",
            ["confirm c1", "judge 4/4"],
            True,
            0,
        ),
        (
            "the same value seen again (a watch echo) confirms nothing",
            ["confirm c1", "judge 4/4", "confirm c1"],
            True,
            0,
        ),
        ("an absent key (store lost) confirms nothing", ["judge 4/4", "confirm -"], True, 0),
        (
            "a new value after the store lost the key confirms",
            ["confirm c1", "judge 4/4", "confirm -", "confirm c2"],
            False,
            4,
        ),
        ("released with the latest count", ["judge 6/6", "judge 5/6", "confirm c1"], False, 5),
        (
            "a confirmed episode stays released while the view still asks",
            ["judge 4/4", "confirm c1", "judge 4/4", "judge 3/4"],
            False,
            0,
        ),
        (
            "the next episode needs a new confirmation",
            ["judge 4/4", "confirm c1", "judge 0/4", "judge 4/4", "confirm c1"],
            True,
            0,
        ),
        (
            "the next episode, confirmed anew",
            ["judge 4/4", "confirm c1", "judge 0/4", "judge 4/4", "confirm c2"],
            False,
            4,
        ),
        ("the timer still releases (fallback)", ["judge 4/4", "wait 601"], False, 0),
        (
            "after the timer, nothing left to release",
            ["judge 4/4", "wait 601", "confirm c1"],
            False,
            0,
        ),
    ],
)
def test_unload_floor_operator_confirmation(
    case: str, steps: list[str], holding: bool, released: int
) -> None:
    """controlplane/link/floor.py: ``meshctl nodes confirm-unloads`` (UNLOAD_CONFIRM's value)
    releases the current episode only; ``released``: what the last step released."""
    clock = _Clock()
    floor = UnloadFloor(600.0, clock=clock)
    last = 0
    for step in steps:
        verb, arg = step.split(" ")
        last = 0
        if verb == "judge":
            unloads, held = arg.split("/")
            floor.judge(int(unloads), int(held))
        elif verb == "confirm":
            last = floor.observe_confirmation(b"" if arg == "-" else arg.encode())
        else:
            clock.now += float(arg)
    assert floor.holding() is holding, case
    assert last == released, case


@pytest.mark.parametrize(
    ("case", "known_id", "current_id", "why"),
    [
        ("store id not read yet", "", "abc", None),
        ("same store id", "abc", "abc", None),
        ("a new store id, revision already past the old", "abc", "def", "store id"),
        ("id read failed (empty)", "abc", "", None),
    ],
)
def test_store_replaced_by_store_id(
    case: str, known_id: str, current_id: str, why: str | None
) -> None:
    got = store_replaced(7, 100, _status(7, 500), known_store_id=known_id, store_id=current_id)
    if why is None:
        assert got is None, case
    else:
        assert got is not None and why in got, case


class _Mirror:
    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.reloads = 0

    async def reload(self) -> None:
        self.reloads += 1


@pytest.mark.asyncio
async def test_a_revision_applied_while_the_status_is_read_is_not_a_replacement() -> None:
    mirror = _Mirror(100)
    alarms: list[str] = []

    async def status() -> EtcdStatus:
        now = mirror.revision  # the store's revision when it answered...
        mirror.revision += 1  # ...and the watch applied a newer event before the answer came
        return EtcdStatus(
            cluster_id=7, member_id=1, revision=now, raft_term=1, db_size=1, db_size_in_use=1
        )

    async def compact(revision: int) -> bool:
        return True

    guard = StoreGuard(
        status=status,
        compact=compact,
        mirrors=lambda: [mirror],  # type: ignore[list-item]
        is_leader=lambda: False,
        alarm=alarms.append,
    )
    await guard.step()
    await guard.step()
    assert alarms == [] and mirror.reloads == 0 and guard.replacements == 0
