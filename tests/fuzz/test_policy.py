"""``parse_policy`` on random YAML and text: it returns a valid Policy or raises PolicyError
with a message, never anything else (ValueError from a bad timestamp, RecursionError from deep
nesting, ... are all PolicyError)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.common.policy.config import Policy, PolicyError, parse_policy
from meshserve.common.policy.rule import FILTERS, SCORES
from tests.fuzz._support import FUZZ

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(list(FILTERS) + list(SCORES) + ["name", "default", "rules", "models"]),
)
nested = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=10) | st.sampled_from(["name", "scores"]), children, max_size=4
        )
    ),
    max_leaves=20,
)
rule_like = st.fixed_dictionaries(
    {},
    optional={
        "models": st.lists(st.text(max_size=5), max_size=3) | nested,
        "selector": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | nested,
        "filters": st.lists(st.sampled_from(list(FILTERS)) | st.text(max_size=5)) | nested,
        "scores": st.dictionaries(st.sampled_from(list(SCORES)) | st.text(max_size=5), st.floats())
        | nested,
        "spread_by": st.text(max_size=5) | nested,
        "max_loads_per_node": st.integers() | nested,
    },
)
policy_like = st.fixed_dictionaries(
    {"name": st.from_regex(r"[A-Za-z0-9._-]{1,63}", fullmatch=True) | nested},
    optional={
        "default": rule_like | nested,
        "rules": st.lists(rule_like, max_size=3) | nested,
        "monitoring": st.dictionaries(
            st.sampled_from(["drift_psi_threshold", "drift_windows", "min_accuracy", "webhook"]),
            nested,
        ),
        "bogus": nested,
    },
)
tricky = st.sampled_from(
    [
        "name: x\ndescription: 2001-13-45\n",  # a timestamp that is not a date
        "name: !!timestamp 2001-02-30\n",
        "name: !!int 'x'\n",
        "name: !!float 'abc'\n",
        "name: !!binary '#'\n",
        "name: !!python/object:os.system x\n",
        "[" * 5000 + "]" * 5000,  # deeper than the YAML composer can recurse
        "name: x\ndefault: " + "{a: " * 200 + "1" + "}" * 200,
        "a: &a [*a, *a]\n",
        "&a [*a]",
        "? [a]\n: b\n",
        "name: x\nname: y\n",
        "",
        "\ufeff",
        "--- a\n--- b\n",
        "name: x\n" + "x: " + "a" * 300_000,
    ]
)
policy_texts = st.one_of(
    policy_like.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    nested.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=200),
    st.text(alphabet="[]{}:,-&*!?|>'\"%@` \n\tab01", max_size=200),
    tricky,
)


@settings(FUZZ, max_examples=400)
@given(text=policy_texts)
def test_parse_policy_returns_a_policy_or_raises_policy_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        assert str(exc).strip()
        assert exc.reason.strip()
        return
    assert isinstance(policy, Policy)
    assert policy.name


@pytest.mark.parametrize(
    "text",
    [
        "name: x\ndescription: 2001-13-45\n",
        "[" * 5000 + "]" * 5000,
        "name: !!float 'abc'\n",
        "\x1f",
    ],
    ids=["bad-timestamp", "deep-nesting", "bad-tagged-float", "control-character"],
)
def test_found_by_fuzzing_are_policy_errors(text: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert str(info.value).strip()
