"""Resolution (meshserve.common.routing.resolve): which variant a query gets and which
copies may answer it, on hand-built snapshots (pure)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Mapping
from types import MappingProxyType

import pytest

from meshserve.common.errors import FailedPrecondition, NotFound, StatusError, Unavailable
from meshserve.common.routing.resolve import (
    IDLE,
    CopyFacts,
    LiveLoad,
    Resolution,
    alias_state,
    best_variant,
    cached_alternatives,
    candidates,
    copy_load,
    default_slo,
    explain_switching,
    no_copy,
    resolve_variant,
    resolve_version,
    serving_variant,
    serving_version,
    uses_switching,
    variant_options,
    version_states,
    versions,
)
from meshserve.common.routing.rollout import Route, canary_draw
from meshserve.common.routing.switching import Switcher
from meshserve.controlplane.snapshot import NodeView, Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import alias, node

R, L, F = mesh_pb2.READY, mesh_pb2.LOADING, mesh_pb2.FAILED
NOBODY: frozenset[str] = frozenset()


def spec(
    variant: str,
    accuracy: float = 0.9,
    *,
    copies: int = 1,
    slo_ms: float = 0.0,
    cache: bool = False,
    max_batch: int = 0,
    version: str = "",
) -> mesh_pb2.ModelSpec:
    out = mesh_pb2.ModelSpec(
        name="m", variant=variant, accuracy=accuracy, copies=copies, slo_ms=slo_ms, version=version
    )
    out.serving.cache = cache
    out.serving.batching.max_batch_size = max_batch
    return out


def snap(
    specs: Collection[mesh_pb2.ModelSpec],
    copies: Mapping[str, Mapping[str, int]],
    *,
    direct: Collection[str] = (),
    placed: Mapping[str, list[str]] | None = None,
    failed: Mapping[str, Mapping[str, str]] | None = None,
    draining: Collection[str] = (),
    aliases: Collection[mesh_pb2.Alias] = (),
) -> Snapshot:
    """``copies``: node -> variant of model "m" -> state; ``direct``: nodes with an OIP port;
    ``placed``/``failed``: a placement per variant (its nodes, its failed copies)."""
    nodes = {}
    for node_id, held in copies.items():
        view = node(node_id, copies={("m", v): state for v, state in held.items()})
        if node_id in direct:
            view = dataclasses.replace(view, direct_address=f"{node_id}:8001")
        nodes[node_id] = view
    placements = {
        ("m", v): mesh_pb2.Placement(
            model="m",
            variant=v,
            nodes=(placed or {}).get(v, []),
            failed=(failed or {}).get(v, {}),
        )
        for v in set(placed or {}) | set(failed or {})
    }
    return Snapshot(
        models=MappingProxyType({("m", s.variant): s for s in specs}),
        placements=MappingProxyType(placements),
        nodes=MappingProxyType(nodes),
        draining=frozenset(draining),
        aliases=MappingProxyType({(a.model, a.alias): a for a in aliases}),
    )


A = spec("a")

# (case, copies, linked, direct, placed, draining, expected candidates)
CANDIDATE_CASES: list[
    tuple[str, dict[str, dict[str, int]], set[str], set[str], list[str] | None, set[str], list[str]]
] = [
    (
        "a ready copy on a node whose stream the router holds is a candidate",
        {"n1": {"a": R}},
        {"n1"},
        set(),
        None,
        set(),
        ["n1"],
    ),
    (
        "a copy neither linked nor with a direct port cannot be reached",
        {"n1": {"a": R}},
        set(),
        set(),
        None,
        set(),
        [],
    ),
    (
        "a direct port makes a copy reachable without a stream (the SDK's case)",
        {"n1": {"a": R}, "n2": {"a": R}},
        set(),
        {"n2"},
        None,
        set(),
        ["n2"],
    ),
    (
        "loading and failed copies are not candidates",
        {"n1": {"a": L}, "n2": {"a": F}, "n3": {"a": R}},
        {"n1", "n2", "n3"},
        set(),
        None,
        set(),
        ["n3"],
    ),
    (
        "candidates come in node-id order",
        {"n3": {"a": R}, "n1": {"a": R}, "n2": {"a": R}},
        {"n1", "n2", "n3"},
        set(),
        None,
        set(),
        ["n1", "n2", "n3"],
    ),
    (
        "copies the placement still wants are preferred over one it dropped",
        {"n1": {"a": R}, "n2": {"a": R}},
        {"n1", "n2"},
        set(),
        ["n2"],
        set(),
        ["n2"],
    ),
    (
        "a copy the placement dropped still answers when it is the only one",
        {"n1": {"a": R}},
        {"n1"},
        set(),
        ["n9"],
        set(),
        ["n1"],
    ),
    (
        "a draining node gets no new query while another copy serves",
        {"n1": {"a": R}, "n2": {"a": R}},
        {"n1", "n2"},
        set(),
        ["n1", "n2"],
        {"n1"},
        ["n2"],
    ),
    (
        "a copy not wanted but not draining beats a wanted one on a draining node",
        {"n1": {"a": R}, "n2": {"a": R}},
        {"n1", "n2"},
        set(),
        ["n1"],
        {"n1"},
        ["n2"],
    ),
    (
        "the last copy on a draining node still answers",
        {"n1": {"a": R}},
        {"n1"},
        set(),
        ["n1"],
        {"n1"},
        ["n1"],
    ),
]


@pytest.mark.parametrize(
    ("copies", "linked", "direct", "placed", "draining", "expected"),
    [c[1:] for c in CANDIDATE_CASES],
    ids=[c[0] for c in CANDIDATE_CASES],
)
def test_candidates(
    copies: dict[str, dict[str, int]],
    linked: set[str],
    direct: set[str],
    placed: list[str] | None,
    draining: set[str],
    expected: list[str],
) -> None:
    s = snap(
        [A], copies, direct=direct, placed={"a": placed} if placed else None, draining=draining
    )
    assert [n.node_id for n in candidates(s, A, linked)] == expected


EVERYONE = {"n1", "n2", "n3"}
TWO = [spec("small", 0.8), spec("big", 0.95)]  # two variants of the implicit version
#: two versions, each with one variant named after it
VTWO = [spec("small", 0.8, version="small"), spec("big", 0.95, version="big")]

# (case, specs, copies, aliases, version, draw, expected variant, expected alias reason or None)
RESOLVE_CASES: list[
    tuple[
        str,
        list[mesh_pb2.ModelSpec],
        dict[str, dict[str, int]],
        list[mesh_pb2.Alias],
        str,
        float,
        str,
        str | None,
    ]
] = [
    (
        "no version and no alias: the most accurate variant with a ready copy",
        TWO,
        {"n1": {"small": R, "big": R}},
        [],
        "",
        50.0,
        "big",
        None,
    ),
    (
        "no version: a more accurate variant without a ready copy is passed over",
        TWO,
        {"n1": {"small": R, "big": L}},
        [],
        "",
        50.0,
        "small",
        None,
    ),
    (
        "no version and nothing ready: the most accurate anyway (it may wake or load)",
        TWO,
        {},
        [],
        "",
        50.0,
        "big",
        None,
    ),
    (
        "a named variant is served even when a better one is ready",
        TWO,
        {"n1": {"small": R, "big": R}},
        [],
        "small",
        50.0,
        "small",
        None,
    ),
    (
        "no version with a live alias follows it",
        VTWO,
        {"n1": {"small": R, "big": R}},
        [alias("small")],
        "",
        50.0,
        "small",
        "live -> small",
    ),
    (
        "a named alias is followed",
        VTWO,
        {"n1": {"small": R, "big": R}},
        [alias("small", name="stable")],
        "stable",
        50.0,
        "small",
        "stable -> small",
    ),
    (
        "a named version is served whatever live points at",
        VTWO,
        {"n1": {"small": R, "big": R}},
        [alias("small")],
        "big",
        50.0,
        "big",
        None,
    ),
    (
        "an alias whose target is still loading keeps its previous version serving",
        VTWO,
        {"n1": {"small": R, "big": L}},
        [alias("big", previous="small")],
        "",
        50.0,
        "small",
        "live -> big warming (0/1 copies ready): small serves",
    ),
    (
        "a low draw goes to a warm canary",
        VTWO,
        {"n1": {"small": R, "big": R}},
        [alias("small", canary="big", percent=20)],
        "",
        10.0,
        "big",
        "live canary 20% -> big",
    ),
    (
        "a high draw stays on the alias's version",
        VTWO,
        {"n1": {"small": R, "big": R}},
        [alias("small", canary="big", percent=20)],
        "",
        20.0,
        "small",
        "live -> small",
    ),
    (
        "a canary on a node the router cannot reach is not warm: it takes nothing",
        VTWO,
        {"n1": {"small": R}, "n9": {"big": R}},
        [alias("small", canary="big", percent=20)],
        "",
        0.0,
        "small",
        "live -> small; canary big not ready",
    ),
]


@pytest.mark.parametrize(
    ("specs", "copies", "aliases", "version", "draw", "expected", "reason"),
    [c[1:] for c in RESOLVE_CASES],
    ids=[c[0] for c in RESOLVE_CASES],
)
def test_resolve_variant(
    specs: list[mesh_pb2.ModelSpec],
    copies: dict[str, dict[str, int]],
    aliases: list[mesh_pb2.Alias],
    version: str,
    draw: float,
    expected: str,
    reason: str | None,
) -> None:
    s = snap(specs, copies, aliases=aliases)
    got, route = resolve_variant(s, "m", version, draw, EVERYONE)
    assert got.variant == expected
    assert (route.reason if route is not None else None) == reason


# (case, model, version, aliases, error, words in its message)
ERROR_CASES: list[tuple[str, str, str, list[mesh_pb2.Alias], type[StatusError], str]] = [
    ("an empty model name", "", "", [], NotFound, "model name is empty"),
    ("an unknown model", "zzz", "", [], NotFound, "unknown model 'zzz'"),
    (
        "an unknown version lists what the model has",
        "m",
        "v9",
        [],
        NotFound,
        "has no version, alias or variant 'v9' (versions: default;",
    ),
    (
        "an alias pointing at a version no longer registered says how to fix it",
        "m",
        "",
        [alias("gone")],
        FailedPrecondition,
        "meshctl model rollout m VERSION",
    ),
]


@pytest.mark.parametrize(
    ("model", "version", "aliases", "error", "words"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
def test_resolution_errors_name_the_fix(
    model: str,
    version: str,
    aliases: list[mesh_pb2.Alias],
    error: type[StatusError],
    words: str,
) -> None:
    s = snap(TWO, {"n1": {"small": R}}, aliases=aliases)
    with pytest.raises(error) as info:
        resolve_variant(s, model, version, 0.0, EVERYONE)
    assert words in info.value.message
    assert serving_version(s, model, version, EVERYONE) == "", "the admin's view: none"


def test_the_serving_variant_never_draws_the_canary() -> None:
    s = snap(
        VTWO, {"n1": {"small": R, "big": R}}, aliases=[alias("small", canary="big", percent=99)]
    )
    assert resolve_variant(s, "m", "", 0.0, EVERYONE)[0].variant == "big"
    assert serving_variant(s, "m", "", EVERYONE).variant == "small"
    assert serving_version(s, "m", "", EVERYONE) == "small"


def test_best_variant_breaks_accuracy_ties_towards_default_then_the_name() -> None:
    tied = [spec("b", 0.9), spec("default", 0.9), spec("a", 0.9)]
    s = snap(tied, {})
    assert best_variant(s, tied, NOBODY).variant == "default"
    no_default = [spec("b", 0.9), spec("a", 0.9)]
    assert best_variant(snap(no_default, {}), no_default, NOBODY).variant == "b"


def test_version_states_count_reachable_ready_copies_against_the_placement() -> None:
    specs = [
        spec("v1", copies=3, version="v1"),
        spec("v2", copies=3, version="v2"),
        spec("v3", copies=0, version="v3"),
    ]
    s = snap(
        specs,
        {"n1": {"v1": R, "v2": R}, "n2": {"v1": R, "v2": L}, "n3": {"v1": R}},
        placed={"v2": ["n1", "n2"]},
    )
    a = alias("v2", previous="v1", canary="v3", percent=10)
    states = version_states(s, "m", a, {"n1", "n2"})
    # v1: no placement, so its registered copies are wanted; n3 is out of reach.
    # v2: the placement's two nodes are wanted, one is ready. v3: nothing, at least one wanted.
    assert {k: (v.ready, v.wanted) for k, v in states.items()} == {
        "v1": (2, 3),
        "v2": (1, 2),
        "v3": (0, 1),
    }
    status = alias_state(s, "m", a, {"n1", "n2"})
    assert status.serving == "v1" and not status.canary_active
    assert [(v.version, v.ready, v.wanted) for v in status.versions] == [
        ("v1", 2, 3),
        ("v2", 1, 2),
        ("v3", 0, 1),
    ]
    unregistered = version_states(s, "m", alias("v9", previous="v1"), EVERYONE)
    assert set(unregistered) == {"v1"}, "a version not registered has no state"


# (case, placement nodes, failed copies, words of the message)
NO_COPY_CASES: list[tuple[str, list[str] | None, dict[str, str] | None, str]] = [
    ("no placement yet", None, None, "model 'm' variant 'a' has no ready copy"),
    ("placed but loading", ["n1", "n2"], None, "placed on n1, n2, not ready yet"),
    (
        "failed copies: a generic reason, never why (that is for admins)",
        ["n1"],
        {"n2": "sha256 mismatch", "n1": "out of memory"},
        "is not available: its copy failed to load (an admin sees why with `meshctl explain",
    ),
]


@pytest.mark.parametrize(
    ("placed", "failed", "words"),
    [c[1:] for c in NO_COPY_CASES],
    ids=[c[0] for c in NO_COPY_CASES],
)
def test_no_copy_tells_the_placements_story(
    placed: list[str] | None, failed: dict[str, str] | None, words: str
) -> None:
    s = snap(
        [A], {}, placed={"a": placed} if placed else None, failed={"a": failed} if failed else None
    )
    error = no_copy(s, A)
    assert isinstance(error, Unavailable)
    assert words in error.message
    assert "mismatch" not in error.message and "memory" not in error.message


THROUGH_LIVE = Route("live", "small", "small", False, False, "live -> small")

# (case, resolution, slo_s, min_accuracy, switches)
SWITCHING_CASES: list[tuple[str, Resolution, float | None, float | None, bool]] = [
    ("an SLO: switching", Resolution("default", tuple(TWO)), 0.05, None, True),
    ("a minimum accuracy alone: switching", Resolution("default", tuple(TWO)), None, 0.9, True),
    (
        "no SLO and no minimum accuracy: resolution",
        Resolution("default", tuple(TWO)),
        None,
        None,
        False,
    ),
    (
        "a pinned variant is never switched",
        Resolution("default", (TWO[0],), pinned=True),
        0.05,
        0.9,
        False,
    ),
    (
        "a version reached through live switches among its variants (rollouts compose)",
        Resolution("small", tuple(VTWO[:1]), THROUGH_LIVE),
        0.05,
        None,
        True,
    ),
]


@pytest.mark.parametrize(
    ("resolution", "slo_s", "min_accuracy", "expected"),
    [c[1:] for c in SWITCHING_CASES],
    ids=[c[0] for c in SWITCHING_CASES],
)
def test_uses_switching(
    resolution: Resolution, slo_s: float | None, min_accuracy: float | None, expected: bool
) -> None:
    assert uses_switching(resolution, slo_s, min_accuracy) is expected


def test_the_default_slo_is_that_of_the_most_accurate_variant() -> None:
    assert default_slo([]) is None
    assert default_slo([spec("a", 0.9, slo_ms=5), spec("b", 0.95, slo_ms=20)]) == 0.020
    assert default_slo([spec("a", 0.9, slo_ms=5), spec("b", 0.95)]) is None


def _profiled(view: NodeView, variant: str, points: dict[int, float], batched: bool) -> NodeView:
    status = view.copies[("m", variant)]
    for size, seconds in points.items():
        status.latency_profile.add(batch_size=size, seconds=seconds)
    status.batched = batched
    return view


# (case, latency profile, cpu cores, the spec's max batch, facts, expected CopyLoad fields)
LOAD_CASES: list[tuple[str, dict[int, float], int, int, CopyFacts, dict[str, object]]] = [
    (
        "the queue is the larger of the router's and the node's count",
        {1: 0.002},
        4,
        0,
        CopyFacts(in_flight=3, reported=7),
        {"queued": 7, "parallel": 4, "max_batch": 32},
    ),
    (
        "the node's reported batch limit wins over the spec's, which wins over 32",
        {1: 0.002},
        1,
        8,
        CopyFacts(max_batch=16),
        {"max_batch": 16},
    ),
    (
        "the spec's batch limit when the node reports none",
        {1: 0.002},
        1,
        8,
        IDLE,
        {"max_batch": 8},
    ),
    (
        "a copy that runs inline (<= 100 us) runs one at a time whatever the cores",
        {1: 50e-6},
        8,
        0,
        IDLE,
        {"parallel": 1},
    ),
    (
        "the router's latency is used only without a profile",
        {},
        2,
        0,
        CopyFacts(observed_s=0.004, slowdown=2.0),
        {"observed_s": 0.004, "slowdown": 2.0, "profile": {}},
    ),
    (
        "with a profile the observed latency is ignored",
        {1: 0.002, 8: 0.006},
        2,
        0,
        CopyFacts(observed_s=0.004),
        {"observed_s": 0.0, "profile": {1: 0.002, 8: 0.006}},
    ),
]


@pytest.mark.parametrize(
    ("profile", "cores", "max_batch", "facts", "expected"),
    [c[1:] for c in LOAD_CASES],
    ids=[c[0] for c in LOAD_CASES],
)
def test_copy_load(
    profile: dict[int, float],
    cores: int,
    max_batch: int,
    facts: CopyFacts,
    expected: dict[str, object],
) -> None:
    view = node("n1", copies={("m", "a"): R})
    view = dataclasses.replace(view, hardware=mesh_pb2.Hardware(cpu_cores=cores))
    view = _profiled(view, "a", profile, batched=True)
    load = copy_load(view, spec("a", max_batch=max_batch), facts)
    assert load.node_id == "n1" and load.batched
    assert {k: getattr(load, k) for k in expected} == expected


def test_variant_options_load_only_reachable_candidates_with_their_facts() -> None:
    s = snap(TWO, {"n1": {"small": R, "big": R}, "n2": {"big": R}})
    seen: list[tuple[str, str, str]] = []

    def facts(key: tuple[str, str, str]) -> CopyFacts:
        seen.append(key)
        return CopyFacts(in_flight=len(seen))

    options = variant_options(s, TWO, {"n1"}, facts)
    assert [(o.spec.variant, [c.node_id for c in o.copies]) for o in options] == [
        ("small", ["n1"]),
        ("big", ["n1"]),
    ]
    assert seen == [("n1", "m", "small"), ("n1", "m", "big")]
    assert [o.copies[0].queued for o in options] == [1, 2]


def _options_for_cache(
    ready: Collection[str], cache: Collection[str]
) -> tuple[list[mesh_pb2.ModelSpec], Snapshot]:
    specs = [
        spec(v, acc, cache=v in cache)
        for v, acc in (("tiny", 0.7), ("small", 0.8), ("mid", 0.9), ("big", 0.95))
    ]
    return specs, snap(specs, {"n1": dict.fromkeys(ready, R)})


def test_cached_alternatives_are_more_accurate_ready_caching_variants_best_first() -> None:
    specs, s = _options_for_cache(ready={"small", "mid", "big"}, cache={"tiny", "mid", "big"})
    options = variant_options(s, specs, {"n1"}, lambda _: IDLE)
    choice = Switcher().choose("m", options, None)
    assert choice.spec.variant == "big"
    small = next(o for o in options if o.spec.variant == "small")
    chose_small = dataclasses.replace(choice, spec=small.spec)
    assert cached_alternatives(options, chose_small, None) == ["big", "mid"]
    assert cached_alternatives(options, chose_small, 0.93) == ["big"], "the floor holds"
    assert cached_alternatives(options, choice, None) == [], "nothing beats the best"


def test_cached_alternatives_skip_variants_without_a_ready_copy() -> None:
    specs, s = _options_for_cache(ready={"small", "mid"}, cache={"mid", "big"})
    options = variant_options(s, specs, {"n1"}, lambda _: IDLE)
    small = next(o for o in options if o.spec.variant == "small")
    choice = Switcher().choose("m", [small], None)
    assert cached_alternatives(options, choice, None) == ["mid"]


def _explain_snapshot() -> Snapshot:
    """Two variants, one node with one core: "accurate" runs in 8 ms, "fast" in 1 ms."""
    specs = [spec("fast", 0.80, slo_ms=30), spec("accurate", 0.95, slo_ms=30)]
    s = snap(specs, {"n1": {"fast": R, "accurate": R}})
    view = s.nodes["n1"]
    view = dataclasses.replace(view, hardware=mesh_pb2.Hardware(cpu_cores=1))
    _profiled(view, "fast", {1: 0.001}, batched=False)
    _profiled(view, "accurate", {1: 0.008}, batched=False)
    return dataclasses.replace(s, nodes=MappingProxyType({"n1": view}))


def test_explain_switching_answers_from_the_snapshot_and_the_live_load() -> None:
    s = _explain_snapshot()
    idle = explain_switching(s, "m", 0.0, 0.0, linked={"n1"}, live=LiveLoad())
    assert idle.slo_ms == pytest.approx(30.0), "the model's default SLO"
    assert (idle.chosen, idle.reason) == ("accurate", "most accurate within SLO")
    assert [(v.variant, v.ready_copies, v.queued) for v in idle.variants] == [
        ("accurate", 1, 0),
        ("fast", 1, 0),
    ]
    assert idle.variants[0].predicted_ms == pytest.approx(8.0 + 1.5)
    busy = LiveLoad(copies={("n1", "m", "accurate"): CopyFacts(in_flight=2, slowdown=1.5)})
    loaded = explain_switching(s, "m", 0.0, 0.0, linked={"n1"}, live=busy)
    assert (loaded.chosen, loaded.reason) == ("fast", "switched to meet SLO")
    assert loaded.variants[0].queued == 2 and loaded.variants[0].slowdown == 1.5
    unreachable = explain_switching(s, "m", 0.0, 0.0, linked=NOBODY, live=LiveLoad())
    assert unreachable.reason == "no ready copy yet"
    assert [v.predicted_ms for v in unreachable.variants] == [-1.0, -1.0]


def test_explain_switching_honours_the_hysteresis_level_it_is_given() -> None:
    s = _explain_snapshot()
    # The accurate copy is predicted at 8 ms + 1.5 ms transport = 9.5 ms: within 0.45 x 22 ms,
    # but not within 0.8 x that once the model stepped down (to 0.80).
    fresh = explain_switching(s, "m", 22.0, 0.0, linked={"n1"}, live=LiveLoad())
    assert fresh.chosen == "accurate"
    stepped_down = explain_switching(s, "m", 22.0, 0.0, linked={"n1"}, live=LiveLoad(level=0.80))
    assert stepped_down.chosen == "fast"


def test_explain_switching_refuses_an_unknown_model_and_an_impossible_accuracy() -> None:
    s = _explain_snapshot()
    with pytest.raises(NotFound, match="unknown model 'zzz'"):
        explain_switching(s, "zzz", 0.0, 0.0, linked={"n1"}, live=LiveLoad())
    with pytest.raises(FailedPrecondition, match=r"no variant reaches min_accuracy 0\.99"):
        explain_switching(s, "m", 0.0, 0.99, linked={"n1"}, live=LiveLoad())


def test_live_load_reads_missing_copies_as_idle() -> None:
    live = LiveLoad(copies={("n1", "m", "a"): CopyFacts(in_flight=4)})
    assert live.facts(("n1", "m", "a")).in_flight == 4
    assert live.facts(("n2", "m", "a")) == IDLE


# -- versions and their variants (issue 14 §1) ---------------------------------------------------

#: flower: version v1 (variants v1, v1-fast) and version v2 (variants v2, v2-fast)
TREE = [
    spec("v1", 0.90, version="v1", slo_ms=30),
    spec("v1-fast", 0.80, version="v1", slo_ms=30),
    spec("v2", 0.95, version="v2", slo_ms=30),
    spec("v2-fast", 0.85, version="v2", slo_ms=30),
]
ALL_READY = {"n1": {"v1": R, "v1-fast": R, "v2": R, "v2-fast": R}}


def _tree_snapshot(*aliases: mesh_pb2.Alias) -> Snapshot:
    """TREE on one one-core node: the accurate variants run in 8 ms, the fast ones in 1 ms."""
    s = snap(TREE, ALL_READY, aliases=aliases)
    view = dataclasses.replace(s.nodes["n1"], hardware=mesh_pb2.Hardware(cpu_cores=1))
    for variant, seconds in (("v1", 0.008), ("v1-fast", 0.001), ("v2", 0.008), ("v2-fast", 0.001)):
        _profiled(view, variant, {1: seconds}, batched=False)
    return dataclasses.replace(s, nodes=MappingProxyType({"n1": view}))


def test_versions_group_variants_and_unversioned_ones_form_the_implicit_version() -> None:
    s = snap([*TREE, spec("old")], {})
    tree = {v: [x.variant for x in specs] for v, specs in versions(s, "m").items()}
    assert tree == {"default": ["old"], "v1": ["v1", "v1-fast"], "v2": ["v2", "v2-fast"]}


# (case, aliases, name, draw, expected version, expected variants, pinned)
VERSION_CASES: list[tuple[str, list[mesh_pb2.Alias], str, float, str, list[str], bool]] = [
    ("nothing named follows live", [alias("v1")], "", 50.0, "v1", ["v1", "v1-fast"], False),
    (
        "a later version takes nothing until live moves",
        [alias("v1")],
        "",
        0.0,
        "v1",
        ["v1", "v1-fast"],
        False,
    ),
    (
        "a version's name selects all its variants",
        [alias("v1")],
        "v2",
        50.0,
        "v2",
        ["v2", "v2-fast"],
        False,
    ),
    (
        "a variant's name pins it (direct pinning)",
        [alias("v1")],
        "v2-fast",
        50.0,
        "v2",
        ["v2-fast"],
        True,
    ),
    (
        "a low draw under a canary gets the canary version's variants",
        [alias("v1", canary="v2", percent=20)],
        "",
        10.0,
        "v2",
        ["v2", "v2-fast"],
        False,
    ),
    (
        "a high draw under a canary stays on the alias's version",
        [alias("v1", canary="v2", percent=20)],
        "",
        20.0,
        "v1",
        ["v1", "v1-fast"],
        False,
    ),
]


@pytest.mark.parametrize(
    ("aliases", "name", "draw", "version", "variants", "pinned"),
    [c[1:] for c in VERSION_CASES],
    ids=[c[0] for c in VERSION_CASES],
)
def test_resolve_version(
    aliases: list[mesh_pb2.Alias],
    name: str,
    draw: float,
    version: str,
    variants: list[str],
    pinned: bool,
) -> None:
    found = resolve_version(snap(TREE, ALL_READY, aliases=aliases), "m", name, draw, EVERYONE)
    assert found.version == version
    assert [s.variant for s in found.variants] == variants
    assert found.pinned is pinned


def test_a_model_with_one_version_and_no_alias_serves_it_but_two_need_live() -> None:
    one = snap(TWO, {"n1": {"small": R, "big": R}})
    assert resolve_version(one, "m", "", 0.0, EVERYONE).version == "default"
    two = snap(TREE, ALL_READY)
    with pytest.raises(FailedPrecondition, match="meshctl model rollout m VERSION"):
        resolve_version(two, "m", "", 0.0, EVERYONE)


def test_version_states_sum_the_variants_of_each_version() -> None:
    s = snap(TREE, {"n1": {"v1": R, "v1-fast": R, "v2": R}}, placed={"v2-fast": ["n2"]})
    states = version_states(s, "m", alias("v2", previous="v1"), {"n1"})
    assert {k: (v.ready, v.wanted) for k, v in states.items()} == {"v1": (2, 2), "v2": (1, 2)}
    status = alias_state(s, "m", alias("v2", previous="v1"), {"n1"})
    assert status.serving == "v1", "v2 is not warm until every variant has its copies"
    assert [list(v.variants) for v in status.versions] == [["v1", "v1-fast"], ["v2", "v2-fast"]]


SPIKE = LiveLoad(copies={("n1", "m", "v1"): CopyFacts(in_flight=6)})


def test_switching_under_a_spike_stays_inside_the_live_version() -> None:
    s = _tree_snapshot(alias("v1"))
    calm = explain_switching(s, "m", 0.0, 0.0, linked={"n1"}, live=LiveLoad())
    assert (calm.version, calm.route, calm.chosen) == ("v1", "live -> v1", "v1")
    spiked = explain_switching(s, "m", 0.0, 0.0, linked={"n1"}, live=SPIKE)
    assert (spiked.version, spiked.chosen, spiked.reason) == (
        "v1",
        "v1-fast",
        "switched to meet SLO",
    )
    assert [v.variant for v in spiked.variants] == ["v1", "v1-fast"], "v2's variants never compete"
    # the same through the functions the gateway composes
    found = resolve_version(s, "m", "", 99.0, {"n1"})
    options = variant_options(s, found.variants, {"n1"}, SPIKE.facts)
    assert Switcher().choose("m", options, 0.030, version=found.version).spec.variant == "v1-fast"


def test_a_rollout_during_switching_moves_the_version_and_switching_follows() -> None:
    canary = _tree_snapshot(alias("v1", canary="v2", percent=20))
    switcher = Switcher()
    picks: Counter[str] = Counter()
    for i in range(500):
        found = resolve_version(canary, "m", "", canary_draw(f"q{i}"), {"n1"})
        spike = LiveLoad(copies={("n1", "m", v): CopyFacts(in_flight=6) for v in ("v1", "v2")})
        options = variant_options(canary, found.variants, {"n1"}, spike.facts)
        picks[switcher.choose("m", options, 0.030, version=found.version).spec.variant] += 1
    assert set(picks) == {"v1-fast", "v2-fast"}, "each query switches inside its own version"
    assert 0.14 < picks["v2-fast"] / 500 < 0.26
    moved = _tree_snapshot(alias("v2", previous="v1"))
    full = explain_switching(moved, "m", 0.0, 0.0, linked={"n1"}, live=LiveLoad())
    assert (full.version, full.chosen) == ("v2", "v2"), "a calm v2 answers with its best variant"
    pinned = explain_switching(moved, "m", 0.0, 0.0, linked={"n1"}, live=SPIKE, version="v1-fast")
    assert (pinned.version, pinned.chosen, pinned.reason) == ("v1", "v1-fast", "pinned variant")
