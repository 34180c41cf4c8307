"""The eviction step: every eviction plugin as a table of cases, and how a policy selects and
parameterises one (pure, fast; the scheduler's use of it is in tests/unit/test_scheduler.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshserve.common.policy.config import PolicyError, parse_policy
from meshserve.common.policy.eviction import (
    DEFAULT_EVICTION,
    EVICTIONS,
    CheapestReloadParams,
    EvictionParams,
    NeverEvictParams,
)
from meshserve.common.policy.rule import DEFAULT_RULE, Rule
from meshserve.controlplane.placement.policies.pipeline import EVICTION_PLUGINS, eviction_step
from meshserve.controlplane.placement.policies.plugins.cheapest_reload import CheapestReload
from tests.support.views import GiB
from tests.unit.policies.builders import Copy, shortfall

CHEAPEST = CheapestReloadParams()
NEVER = NeverEvictParams()


@dataclass(frozen=True)
class EvictCase:
    params: EvictionParams
    title: str
    copies: tuple[Copy, ...]  # on the node, each evictable
    missing_gib: float
    evicted: tuple[str, ...]  # model names of the copies that go, in the plugin's order


CASES = [
    # -- cheapest_reload: value = (1 + in flight) x (load + warm-up s + reload_floor_s) x bytes
    EvictCase(
        CHEAPEST,
        "one copy frees enough: only the quickest to reload of three equal copies goes",
        (Copy("a", 1, load_s=2.0), Copy("b", 1, load_s=0.1), Copy("c", 1, load_s=5.0)),
        0.5,
        ("b",),
    ),
    EvictCase(
        CHEAPEST,
        "a copy in use is worth more: the idle one goes though it reloads slower",
        (Copy("a", 1, load_s=1.0, in_flight=9), Copy("b", 1, load_s=2.0)),
        0.5,
        ("b",),
    ),
    EvictCase(
        CHEAPEST,
        "size weighs: of two copies alike but for size the smaller goes",
        (Copy("a", 2), Copy("b", 1)),
        0.5,
        ("b",),
    ),
    EvictCase(
        CHEAPEST,
        "one copy too small: the cheapest go first until the missing memory is freed",
        (Copy("a", 2), Copy("b", 1), Copy("c", 4, load_s=9.0)),
        2.5,
        ("b", "a"),
    ),
    EvictCase(
        CHEAPEST,
        "one copy alone frees enough: the cheaper one that frees too little is not taken too",
        (Copy("a", 0.08), Copy("b", 0.2)),
        0.12,
        ("b",),
    ),
    EvictCase(
        CHEAPEST,
        "the cheapest sufficient set: two small idle copies rather than one big busy copy",
        (Copy("a", 0.3), Copy("b", 0.3), Copy("c", 1, in_flight=5)),
        0.5,
        ("a", "b"),
    ),
    EvictCase(
        CHEAPEST,
        "the cheapest sufficient set: one mid copy rather than the two cheapest plus a third",
        (Copy("a", 0.2), Copy("b", 0.25), Copy("c", 0.6), Copy("d", 3, load_s=9.0)),
        0.55,
        ("c",),
    ),
    EvictCase(
        CHEAPEST,
        "warm-up time counts as reload time",
        (Copy("a", 1, load_s=0.1, warmup_s=3.0), Copy("b", 1, load_s=1.0)),
        0.5,
        ("b",),
    ),
    EvictCase(
        CHEAPEST,
        "a copy the node reports no status for is taken to reload in 1 s by default",
        (Copy("a", 1, load_s=None), Copy("b", 1, load_s=2.0)),
        0.5,
        ("a",),
    ),
    EvictCase(
        CheapestReloadParams(unknown_reload_s=5.0),
        "unknown_reload_s 5: the copy never measured is now the dearer one",
        (Copy("a", 1, load_s=None), Copy("b", 1, load_s=2.0)),
        0.5,
        ("b",),
    ),
    EvictCase(
        CHEAPEST,
        "equal values: the lower variant key goes first",
        (Copy("b", 1), Copy("a", 1)),
        0.5,
        ("a",),
    ),
    EvictCase(
        CHEAPEST,
        "instant reloads still weigh by use and size through reload_floor_s",
        (Copy("a", 4, load_s=0.0, in_flight=50), Copy("b", 1, load_s=0.01)),
        0.5,
        ("b",),
    ),
    EvictCase(
        CheapestReloadParams(reload_floor_s=0.0),
        "reload_floor_s 0: a copy that reloads instantly costs nothing, however busy",
        (Copy("a", 4, load_s=0.0, in_flight=50), Copy("b", 1, load_s=0.01)),
        0.5,
        ("a",),
    ),
    EvictCase(
        CHEAPEST,
        "all copies together free too little: nothing goes",
        (Copy("a", 1), Copy("b", 1)),
        2.5,
        (),
    ),
    EvictCase(
        CHEAPEST,
        "nothing on the node may go: nothing goes",
        (),
        0.5,
        (),
    ),
    EvictCase(
        CheapestReloadParams(max_victims=1),
        "max_victims 1: a node that would need two evictions is not used",
        (Copy("a", 2), Copy("b", 1)),
        2.5,
        (),
    ),
    EvictCase(
        CheapestReloadParams(max_victims=2),
        "max_victims 2: two evictions are allowed",
        (Copy("a", 2), Copy("b", 1)),
        2.5,
        ("b", "a"),
    ),
    # -- never
    EvictCase(
        NEVER,
        "never: nothing goes though one idle copy would free enough",
        (Copy("a", 4, load_s=0.0),),
        0.5,
        (),
    ),
    EvictCase(
        NEVER,
        "never: nothing goes however short the node",
        (Copy("a", 1), Copy("b", 1)),
        1.5,
        (),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.params.plugin}: {c.title}" for c in CASES])
def test_eviction(case: EvictCase) -> None:
    q = shortfall(case.copies, case.missing_gib)
    victims = eviction_step(case.params).victims(q)
    assert tuple(v.key[0] for v in victims) == case.evicted
    freed = sum(c.gib for c in case.copies if c.name in case.evicted)
    assert not victims or freed >= case.missing_gib, "an answer frees what is missing"


def test_every_eviction_plugin_has_a_table() -> None:
    counts = {name: sum(c.params.plugin == name for c in CASES) for name in EVICTION_PLUGINS}
    assert all(n >= 2 for n in counts.values()), f"plugins with fewer than 2 cases: {counts}"
    assert tuple(EVICTION_PLUGINS) == EVICTIONS


def test_cheapest_reload_reports_the_value_of_what_it_evicts() -> None:
    copy = Copy("a", 2, load_s=0.5, warmup_s=0.25, in_flight=3)
    [victim] = CheapestReload().victims(shortfall((copy,), 1))
    assert victim.key == ("a", "default")
    assert victim.value == pytest.approx((1 + 3) * (0.5 + 0.25 + 0.05) * 2 * GiB)


def test_the_plugin_built_is_the_one_the_params_name_with_them() -> None:
    step = eviction_step(CheapestReloadParams(max_victims=3))
    assert isinstance(step, CheapestReload) and step.params.max_victims == 3
    assert eviction_step(NEVER).name == "never"
    assert eviction_step(DEFAULT_RULE.eviction).name == "cheapest_reload"


# -- the policy file ---------------------------------------------------------------------------


def test_the_built_in_eviction_is_cheapest_reload_with_its_defaults() -> None:
    assert DEFAULT_RULE.eviction == DEFAULT_EVICTION == CheapestReloadParams()
    assert parse_policy("name: p\n").default.eviction == DEFAULT_EVICTION


def test_eviction_is_selected_and_parameterised_per_rule_and_replaced_whole() -> None:
    policy = parse_policy(
        "name: p\n"
        "default:\n"
        "  eviction: {plugin: cheapest_reload, max_victims: 2, unknown_reload_s: 3}\n"
        "rules:\n"
        "  - models: ['pinned-*']\n"
        "    eviction: {plugin: never}\n"
        "  - models: ['light-*']\n"
        "    eviction: {plugin: cheapest_reload, reload_floor_s: 0}\n"
        "  - models: ['other-*']\n"
        "    spread_by: rack\n"
    )
    assert policy.default.eviction == CheapestReloadParams(max_victims=2, unknown_reload_s=3.0)
    assert policy.rules[0].eviction == NeverEvictParams()
    # A rule's eviction replaces the default's whole: max_victims is back to unset.
    assert policy.rules[1].eviction == CheapestReloadParams(reload_floor_s=0.0)
    assert policy.rules[2].eviction == policy.default.eviction


ERRORS = [
    (
        "an unknown eviction plugin is refused at its name, with the known ones",
        "name: p\ndefault:\n  eviction:\n    plugin: lru\n",
        "line 4: default.eviction.plugin: unknown eviction plugin 'lru'; "
        "known: cheapest_reload, never",
    ),
    (
        "an eviction step without a plugin name",
        "name: p\nrules:\n  - models: [a]\n    eviction: {max_victims: 2}\n",
        "line 4: rules[0].eviction: the eviction step needs 'plugin': one of "
        "cheapest_reload, never",
    ),
    (
        "a parameter of another plugin",
        "name: p\ndefault:\n  eviction:\n    plugin: never\n    max_victims: 2\n",
        "line 5: default.eviction.max_victims: unknown parameter 'max_victims' of eviction "
        "plugin 'never'",
    ),
    (
        "a parameter out of range",
        "name: p\ndefault:\n  eviction:\n    plugin: cheapest_reload\n    max_victims: 0\n",
        "line 5: default.eviction.max_victims: Input should be greater than or equal to 1",
    ),
    (
        "a negative reload time",
        "name: p\ndefault:\n  eviction: {plugin: cheapest_reload, unknown_reload_s: -1}\n",
        "line 3: default.eviction.unknown_reload_s: Input should be greater than or equal to 0",
    ),
    (
        "an eviction step that is not a mapping",
        "name: p\ndefault:\n  eviction: never\n",
        "line 3: default.eviction: Input should be a valid dictionary or object to extract "
        "fields from",
    ),
]


@pytest.mark.parametrize(("text", "error"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_a_bad_eviction_step_is_a_precise_policy_error(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert str(info.value) == error


def test_a_rule_refuses_an_eviction_that_is_not_a_plugin_s_params() -> None:
    with pytest.raises(ValueError, match="unknown eviction plugin"):
        Rule(eviction="never")  # type: ignore[arg-type]
