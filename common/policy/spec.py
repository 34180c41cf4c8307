"""The placement-policy file's schema: pydantic models of every field, and its JSON schema.

Contract:

* :class:`PolicySpec` is the whole file; :class:`RuleSpec` the placement settings of ``default``
  and of each rule (every field optional: unset means "inherit"); :class:`MatchRuleSpec` a rule
  with what it matches. Every model is strict, frozen, and forbids unknown keys, so a typo is an
  error rather than a silent default.
* Plugin names are checked against :data:`~meshserve.common.policy.rule.FILTERS`,
  :data:`~meshserve.common.policy.rule.SCORES` and, for the eviction step, the tagged parameter
  models of :mod:`meshserve.common.policy.eviction`.
* :func:`policy_json_schema` is the JSON schema of the file (``docs/policy-schema.json``,
  written by :func:`write_schema`), for editors. Validation with line numbers, and resolution
  to rules, are in :mod:`meshserve.common.policy.config`.

Importing this module has no side effects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meshserve.common.policy.eviction import EVICTIONS, EvictionParams
from meshserve.common.policy.rule import FILTERS, SCORES

__all__ = [
    "SCHEMA_ID",
    "MatchRuleSpec",
    "MonitoringSpec",
    "PolicySpec",
    "RuleSpec",
    "WebhookSpec",
    "policy_json_schema",
    "write_schema",
]

SCHEMA_ID: Final = "https://meshserve.dev/schemas/policy-schema.json"


def _check_filter(name: str) -> str:
    if name not in FILTERS:
        raise PydanticCustomError(
            "unknown_filter",
            "unknown filter plugin {name}; known: {known}",
            {"name": repr(name), "known": ", ".join(FILTERS)},
        )
    return name


def _check_score(name: str) -> str:
    if name not in SCORES:
        raise PydanticCustomError(
            "unknown_score",
            "unknown score plugin {name}; known: {known}",
            {"name": repr(name), "known": ", ".join(SCORES)},
        )
    return name


FilterName = Annotated[
    str,
    AfterValidator(_check_filter),
    WithJsonSchema({"type": "string", "enum": list(FILTERS)}),
]
ScoreName = Annotated[
    str,
    AfterValidator(_check_score),
    WithJsonSchema({"type": "string", "enum": list(SCORES)}),
]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Labels = dict[str, str]


class RuleSpec(BaseModel):
    """Placement settings; every field is optional and unset means "inherit"."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    filters: list[FilterName] | None = Field(
        default=None,
        description="Filter plugins to run (always in their built-in order). "
        f"Default: all of {', '.join(FILTERS)}.",
    )
    scores: dict[ScoreName, Weight] | None = Field(
        default=None,
        description="Score plugin -> weight (>= 0; absent = off). In a rule, replaces the "
        "default's map entirely.",
    )
    spread_by: str | None = Field(
        default=None,
        description="Node label that defines a topology domain (spread, demand_locality); "
        '"" disables both.',
    )
    prefer_labels: Labels | None = Field(
        default=None, description="Node labels the affinity score favours."
    )
    avoid_labels: Labels | None = Field(
        default=None, description="Node labels the anti_affinity filter rejects."
    )
    max_loads_per_node: int | None = Field(
        default=None, ge=1, description="New copies a node is given per scheduling pass."
    )
    eviction: EvictionParams | None = Field(
        default=None,
        description="What a variant short of its minimum copies for lack of memory may evict: "
        f"an eviction plugin ({', '.join(EVICTIONS)}) and its parameters. In a rule, replaces "
        "the default's step entirely.",
    )


class MatchRuleSpec(RuleSpec):
    """A rule: which models it applies to, and the settings it overrides."""

    models: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description="fnmatch globs on the model name (case-sensitive); any may match.",
    )
    selector: Labels | None = Field(
        default=None,
        min_length=1,
        description="Matches models whose node_selector contains all of these pairs.",
    )

    @model_validator(mode="after")
    def _needs_a_match(self) -> MatchRuleSpec:
        if self.models is None and self.selector is None:
            raise PydanticCustomError(
                "rule_matches_nothing", "a rule needs 'models', 'selector' or both"
            )
        return self

    def matches(self, name: str, selector: Mapping[str, str]) -> bool:
        if self.models is not None and not any(fnmatchcase(name, g) for g in self.models):
            return False
        if self.selector is not None:
            return all(selector.get(k) == v for k, v in self.selector.items())
        return True


class WebhookSpec(BaseModel):
    """Where drift and accuracy events are POSTed (JSON), e.g. to trigger retraining."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: str = Field(pattern=r"^https?://", description="http(s) URL the event is POSTed to.")
    kinds: list[str] = Field(
        default=["drift", "accuracy"], description="Event kinds sent to the webhook."
    )
    max_retries: int = Field(default=3, ge=0, le=10, description="Retries of a failed POST.")
    min_interval_s: float = Field(
        default=60.0,
        ge=0,
        allow_inf_nan=False,
        description="At most one call per (kind, model, variant) this often; more are dropped.",
    )
    timeout_s: float = Field(default=5.0, gt=0, le=60, allow_inf_nan=False)


class MonitoringSpec(BaseModel):
    """Drift and accuracy alarms (events, metrics, webhook)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    drift_psi_threshold: float = Field(
        default=0.25,
        gt=0,
        allow_inf_nan=False,
        description="A sketch window drifts when a feature's or the output's PSI exceeds this.",
    )
    drift_windows: int = Field(
        default=2, ge=1, le=100, description="Consecutive drifting windows that raise an event."
    )
    capture_windows: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Windows that make the output reference of a variant registered without one.",
    )
    min_accuracy: float | None = Field(
        default=None, ge=0, le=1, description="Live accuracy below this raises an event."
    )
    min_feedback: int = Field(
        default=50, ge=1, description="Labelled answers needed before accuracy is judged."
    )
    webhook: WebhookSpec | None = None


class PolicySpec(BaseModel):
    """A placement-policy file."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="meshserve placement policy",
        json_schema_extra={"$id": SCHEMA_ID},
    )

    name: str = Field(
        pattern=r"^[A-Za-z0-9._-]{1,63}$",
        description="Policy name: 1-63 characters from [A-Za-z0-9._-].",
    )
    description: str | None = Field(default=None, description="Free text for humans.")
    default: RuleSpec | None = Field(
        default=None,
        description="Settings for models no rule matches; unset fields use the built-in ones.",
    )
    rules: list[MatchRuleSpec] | None = Field(
        default=None,
        description="Checked in order; the first matching rule wins. Unset fields inherit "
        "from default.",
    )
    monitoring: MonitoringSpec = Field(
        default_factory=MonitoringSpec, description="Drift and accuracy alarms."
    )


def policy_json_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of a policy file."""
    schema = PolicySpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "meshserve placement policy"
    return schema


def write_schema(path: Path) -> None:
    """Write :func:`policy_json_schema` to ``path``: 2-space indent, sorted keys, final newline."""
    path.write_text(json.dumps(policy_json_schema(), indent=2, sort_keys=True) + "\n")
