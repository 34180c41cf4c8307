"""The placement-policy YAML: parsing, line-numbered errors, rule resolution and matching."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshserve.common.policy.config import (
    DEFAULT_POLICY,
    MAX_POLICY_BYTES,
    Policy,
    PolicyError,
    parse_policy,
    policy_json_schema,
)
from meshserve.common.policy.rule import DEFAULT_RULE, EVICTIONS, FILTERS, SCORES, Rule
from meshserve.protos import mesh_pb2

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "deploy" / "policies").glob("*.yaml"))


@dataclass
class Spec:
    name: str
    node_selector: Mapping[str, str] = field(default_factory=dict)


def same_values(rule: Rule, other: Rule) -> bool:
    """Equal in everything but ``name``."""
    return dataclasses.replace(rule, name="x") == dataclasses.replace(other, name="x")


def error_of(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return info.value


# ------------------------------------------------------------------ examples and defaults


def test_the_example_policies_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "edge-first.yaml",
        "bin-pack.yaml",
        "spread-across-zones.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policy_parses(path: Path) -> None:
    text = path.read_text()
    policy = parse_policy(text)
    assert policy.name == path.stem
    assert policy.source_yaml == text
    assert policy.rule_for(Spec("some-model")).name == f"{path.stem}: default"


def test_edge_first_sends_big_models_to_core() -> None:
    policy = parse_policy((ROOT / "deploy/policies/edge-first.yaml").read_text())
    assert policy.rule_for(Spec("mlp")).prefer_labels == {"tier": "edge"}
    for big in ("resnet50", "bert-large"):
        rule = policy.rule_for(Spec(big))
        assert rule.name == "edge-first: rules[0]"
        assert rule.prefer_labels == {"tier": "core"}
        assert rule.weights == policy.default.weights


def test_spread_across_zones_keeps_sensitive_models_off_edge() -> None:
    policy = parse_policy((ROOT / "deploy/policies/spread-across-zones.yaml").read_text())
    rule = policy.rule_for(Spec("sensitive-fraud"))
    assert rule.avoid_labels == {"tier": "edge"}
    assert "anti_affinity" in rule.filters
    assert policy.rule_for(Spec("fraud")).avoid_labels == {}


def test_default_policy_is_the_default_rule() -> None:
    assert DEFAULT_POLICY.name == "built-in"
    for spec in (Spec("mlp"), Spec("resnet50", {"tier": "edge"})):
        assert same_values(DEFAULT_POLICY.rule_for(spec), DEFAULT_RULE)
    assert same_values(parse_policy("name: built-in\n").default, DEFAULT_RULE)


def test_empty_default_and_rules_keys_are_allowed() -> None:
    policy = parse_policy("name: p\ndefault:\nrules:\n")
    assert same_values(policy.default, DEFAULT_RULE)
    assert policy.rules == ()


def test_rule_for_accepts_a_model_spec_message() -> None:
    policy = parse_policy("name: p\nrules:\n  - selector: {tier: edge}\n    spread_by: rack\n")
    spec = mesh_pb2.ModelSpec(name="mlp", variant="fp32", node_selector={"tier": "edge"})
    assert policy.rule_for(spec).spread_by == "rack"
    assert policy.rule_for(mesh_pb2.ModelSpec(name="mlp")).spread_by == "zone"


# ------------------------------------------------------------------ matching and overrides

MATCHING = """\
name: m
default:
  spread_by: rack
rules:
  - models: ["resnet*", "mlp"]
    spread_by: r0
  - selector: {tier: edge, gpu: "yes"}
    spread_by: r1
  - models: ["bert*"]
    selector: {tier: core}
    spread_by: r2
  - models: ["*"]
    spread_by: r3
"""


@pytest.mark.parametrize(
    ("name", "selector", "index"),
    [
        ("resnet50", {}, 0),
        ("mlp", {"tier": "edge", "gpu": "yes"}, 0),  # first match wins over rules[1]
        ("mlpx", {}, 3),
        ("Resnet50", {}, 3),  # globs are case-sensitive
        ("bert", {"tier": "edge", "gpu": "yes", "zone": "a"}, 1),  # selector: a subset suffices
        ("bert", {"tier": "edge"}, 3),  # selector: every pair is needed
        ("bert-base", {"tier": "core"}, 2),  # models and selector: both needed
        ("albert", {"tier": "core"}, 3),
    ],
)
def test_first_matching_rule_wins(name: str, selector: dict[str, str], index: int) -> None:
    policy = parse_policy(MATCHING)
    rule = policy.rule_for(Spec(name, selector))
    assert rule.name == f"m: rules[{index}]"
    assert rule.spread_by == f"r{index}"
    assert rule is policy.rules[index]


def test_no_matching_rule_gives_the_default() -> None:
    policy = parse_policy(MATCHING.replace('  - models: ["*"]\n    spread_by: r3\n', ""))
    rule = policy.rule_for(Spec("bert", {"tier": "edge"}))
    assert rule.name == "m: default"
    assert rule.spread_by == "rack"
    assert rule is policy.default


def test_rule_for_is_cached_per_name_and_selector() -> None:
    policy = parse_policy(MATCHING)
    first = policy.rule_for(Spec("bert-base", {"tier": "core"}))
    assert policy.rule_for(Spec("bert-base", {"tier": "core"})) is first
    assert policy.rule_for(Spec("bert-base", {"tier": "edge"})).name == "m: rules[3]"
    assert policy.rule_for(Spec("bert-base", {"tier": "core"})) is first


OVERRIDES = """\
name: o
default:
  filters: [not_failed, not_draining, fits_memory]
  scores: {least_loaded: 2, affinity: 1.5}
  spread_by: ""
  prefer_labels: {tier: edge}
  avoid_labels: {pool: spot}
  max_loads_per_node: 3
rules:
  - models: [big]
    scores: {bin_packing: 1}
  - models: [picky]
    filters: [selector]
    prefer_labels: {}
    max_loads_per_node: 1
"""


def test_default_fields_override_the_built_in_rule() -> None:
    default = parse_policy(OVERRIDES).default
    assert default.filters == ("not_draining", "not_failed", "fits_memory")  # FILTERS order
    assert default.weights == {"least_loaded": 2.0, "affinity": 1.5}
    assert default.spread_by == ""
    assert default.prefer_labels == {"tier": "edge"}
    assert default.avoid_labels == {"pool": "spot"}
    assert default.max_loads_per_node == 3


def test_unset_default_fields_keep_the_built_in_values() -> None:
    default = parse_policy("name: d\ndefault:\n  spread_by: rack\n").default
    assert default.spread_by == "rack"
    assert same_values(default, dataclasses.replace(DEFAULT_RULE, spread_by="rack"))


def test_rule_scores_replace_the_default_map() -> None:
    policy = parse_policy(OVERRIDES)
    big = policy.rule_for(Spec("big"))
    assert big.weights == {"bin_packing": 1.0}  # not merged with least_loaded/affinity
    assert same_values(big, dataclasses.replace(policy.default, weights={"bin_packing": 1.0}))


def test_rule_fields_override_one_by_one() -> None:
    policy = parse_policy(OVERRIDES)
    picky = policy.rule_for(Spec("picky"))
    assert picky.filters == ("selector",)
    assert picky.prefer_labels == {}  # set, even if empty, overrides
    assert picky.max_loads_per_node == 1
    assert picky.weights == policy.default.weights
    assert picky.spread_by == ""
    assert picky.avoid_labels == {"pool": "spot"}


# ------------------------------------------------------------------ errors


def test_unknown_score_names_the_line_and_the_known_plugins() -> None:
    err = error_of(
        "name: e\n"  # 1
        "default:\n"  # 2
        "  scores:\n"  # 3
        "    least_loaded: 1\n"  # 4
        "    bogus: 2\n"  # 5
    )
    assert err.line == 5
    assert "default.scores.bogus" in err.reason
    assert "unknown score plugin 'bogus'" in err.reason
    assert "known: " + ", ".join(SCORES) in err.reason
    assert str(err) == f"line 5: {err.reason}"


def test_unknown_filter_in_a_rule() -> None:
    err = error_of(
        "name: e\n"  # 1
        "rules:\n"  # 2
        "  - models: [a]\n"  # 3
        "  - models: [b]\n"  # 4
        "    filters:\n"  # 5
        "      - not_draining\n"  # 6
        "      - fits_mem\n"  # 7
    )
    assert err.line == 7
    assert err.reason.startswith("rules[1].filters[1]: unknown filter plugin 'fits_mem'")
    assert ", ".join(FILTERS) in err.reason


def test_negative_weight() -> None:
    err = error_of("name: e\nrules:\n  - models: [a]\n    scores:\n      spread: -0.5\n")
    assert err.line == 5
    assert "rules[0].scores.spread" in err.reason
    assert "greater than or equal to 0" in err.reason


def test_extra_key_points_at_the_key() -> None:
    err = error_of(
        "name: e\n"  # 1
        "rules:\n"  # 2
        "  - models: [a]\n"  # 3
        "    prefer_lables:\n"  # 4  (typo)
        "      tier: edge\n"  # 5
    )
    assert err.line == 4
    assert err.reason == "rules[0].prefer_lables: unknown field 'prefer_lables'"


def test_extra_top_level_key() -> None:
    err = error_of("name: e\ndescription: x\nrule:\n  - models: [a]\n")
    assert (err.line, err.reason) == (3, "rule: unknown field 'rule'")


@pytest.mark.parametrize(
    ("text", "line", "path", "problem"),
    [
        (
            "name: e\ndefault:\n  max_loads_per_node: two\n",
            3,
            "default.max_loads_per_node",
            "integer",
        ),
        ("name: e\ndefault:\n  max_loads_per_node: 0\n", 3, "default.max_loads_per_node", ">= 1"),
        ("name: e\ndefault:\n  scores: {spread: yes}\n", 3, "default.scores.spread", "number"),
        ("name: e\ndefault:\n  spread_by: [zone]\n", 3, "default.spread_by", "string"),
        (
            "name: e\ndefault:\n\n  prefer_labels: {tier: 1}\n",
            4,
            "default.prefer_labels.tier",
            "string",
        ),
        ("name: e\ndefault:\n  filters: spread\n", 3, "default.filters", "list"),
        ("name: e\nrules: {models: [a]}\n", 2, "rules", "list"),
        ("name: e\nrules:\n  - models: []\n", 3, "rules[0].models", "at least 1"),
        ("name: 'no spaces'\n", 1, "name", "pattern"),
        ("name: 42\n", 1, "name", "string"),
    ],
)
def test_wrong_types_and_values(text: str, line: int, path: str, problem: str) -> None:
    err = error_of(text)
    assert err.line == line
    assert err.reason.startswith(f"{path}: ")
    assert problem in err.reason.replace("greater than or equal to 1", ">= 1")


def test_rule_without_models_or_selector() -> None:
    err = error_of("name: e\nrules:\n  - models: [a]\n  - spread_by: rack\n    scores: {}\n")
    assert err.line == 4
    assert err.reason == "rules[1]: a rule needs 'models', 'selector' or both"


def test_missing_name() -> None:
    err = error_of("# a comment\ndescription: no name\n")
    assert err.line == 2
    assert err.reason == "name: required field is missing"


def test_first_error_is_reported_with_a_count_of_the_others() -> None:
    err = error_of("name: e\ndefault:\n  scores: {bogus: 1}\n  spread_by: 1\n  x: 1\n")
    assert err.line == 3
    assert err.reason.startswith("default.scores.bogus: unknown score plugin")
    assert err.reason.endswith("(and 2 more errors)")
    one_more = error_of("name: e\ndefault:\n  spread_by: 1\n  x: 1\n")
    assert one_more.reason.endswith("(and 1 more error)")


def test_yaml_syntax_error_has_the_line() -> None:
    err = error_of("name: e\ndefault:\n  scores: {spread: 1\n  spread_by: zone\n  x: [\n")
    assert err.line is not None and err.line >= 3
    assert err.reason.startswith("invalid YAML: ")
    bad_indent = error_of("name: e\ndefault:\n  spread_by: zone\n bad: 1\n")
    assert bad_indent.line == 4
    assert bad_indent.reason.startswith("invalid YAML: ")


def test_duplicate_keys_are_rejected() -> None:
    err = error_of("name: e\ndefault:\n  spread_by: zone\n  spread_by: rack\n")
    assert (err.line, err.reason) == (4, "duplicate key 'spread_by'")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("---\n...\n", "empty"),
        ("- name: e\n", "mapping"),
        ("just a string\n", "mapping"),
        ("name: a\n---\nname: b\n", "single document"),
        ("name: a\nx: !!python/object/apply:os.getcwd []\n", "tag"),
    ],
)
def test_not_a_policy_document(text: str, words: str) -> None:
    assert words in error_of(text).reason


def test_too_large_document() -> None:
    text = "name: big\ndescription: " + "x" * MAX_POLICY_BYTES + "\n"
    err = error_of(text)
    assert "256 KiB" in err.reason


def test_alias_bomb_is_rejected() -> None:
    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    err = error_of("\n".join(lines) + "\n")
    assert "aliases" in err.reason


def test_policy_error_is_a_value_error_and_str_without_line() -> None:
    err = PolicyError("the policy file is empty")
    assert isinstance(err, ValueError)
    assert (err.line, str(err)) == (None, "the policy file is empty")


# ------------------------------------------------------------------ JSON schema


def test_committed_json_schema_is_current() -> None:
    committed = (ROOT / "docs" / "policy-schema.json").read_text()
    assert committed == json.dumps(policy_json_schema(), indent=2, sort_keys=True) + "\n", (
        "docs/policy-schema.json is stale: regenerate it with "
        "meshserve.common.policy.config.write_schema"
    )


def test_json_schema_lists_the_plugins() -> None:
    schema = policy_json_schema()
    assert schema["$id"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["name"]
    text = json.dumps(schema)
    assert all(name in text for name in (*FILTERS, *SCORES, *EVICTIONS))


def test_policy_type() -> None:
    assert isinstance(DEFAULT_POLICY, Policy)
    assert DEFAULT_POLICY.source_yaml == "name: built-in\n"
