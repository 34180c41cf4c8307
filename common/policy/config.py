"""The placement-policy YAML file: its validation and its resolution to rules.

Contract:

* :func:`parse_policy` turns YAML text into a :class:`Policy` or raises :class:`PolicyError`,
  which names the 1-based line of the offending YAML node and says what is wrong
  (``"line 7: default.scores.bogus: unknown score plugin 'bogus'; known: ..."``). Only the
  first problem is reported, with a count of the others. Nothing else escapes it.
* A :class:`Policy` is immutable. Every rule is resolved to a
  :class:`~meshserve.common.policy.rule.Rule` when the policy is built, so
  :meth:`Policy.rule_for` only matches (first match wins) and is cached per
  (model name, node selector).
* Resolution: fields left unset in ``default`` fall back to :data:`DEFAULT_RULE`; fields
  left unset in a rule fall back to the resolved default. A rule's ``scores`` map and its
  ``eviction`` step (plugin and parameters) replace the default's as a whole; every other
  field overrides one value.
* :data:`DEFAULT_POLICY` is the empty policy named ``built-in`` (its default is
  :data:`DEFAULT_RULE`'s behaviour).
* The file's schema (pydantic models, :func:`policy_json_schema`, :func:`write_schema`) lives
  in :mod:`meshserve.common.policy.spec` and is re-exported here.

Importing this module has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from meshserve.common.policy.eviction import EVICTIONS
from meshserve.common.policy.rule import DEFAULT_RULE, FILTERS, Rule
from meshserve.common.policy.spec import (
    SCHEMA_ID,
    MatchRuleSpec,
    MonitoringSpec,
    PolicySpec,
    RuleSpec,
    WebhookSpec,
    policy_json_schema,
    write_schema,
)

# The schema's names are re-exported: this module is where users import the policy file from.
__all__ = [
    "DEFAULT_POLICY",
    "MAX_POLICY_BYTES",
    "SCHEMA_ID",
    "MatchRuleSpec",
    "MonitoringSpec",
    "Policy",
    "PolicyError",
    "PolicySpec",
    "RuleSpec",
    "SpecLike",
    "WebhookSpec",
    "parse_policy",
    "policy_json_schema",
    "write_schema",
]

MAX_POLICY_BYTES: Final = 256 * 1024
# Node count with aliases expanded; bounds validation work against "billion laughs" documents.
_MAX_EXPANDED_NODES: Final = 100_000
# Nesting levels a document may have (a real policy has about five).
_MAX_DEPTH: Final = 32
# Resolved-rule cache entries per policy before it is dropped and refilled.
_CACHE_LIMIT: Final = 65_536


class PolicyError(ValueError):
    """An invalid policy file: ``line`` (1-based, or None when unknown) and ``reason``."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line is not None else reason)


# --------------------------------------------------------------------------- resolution


class SpecLike(Protocol):
    """What :meth:`Policy.rule_for` needs of a model (``meshserve.protos.mesh_pb2.ModelSpec``
    fits)."""

    @property
    def name(self) -> str: ...

    @property
    def node_selector(self) -> Mapping[str, str]: ...


def _resolve(spec: RuleSpec, base: Rule, name: str) -> Rule:
    return Rule(
        name=name,
        filters=(
            base.filters if spec.filters is None else tuple(f for f in FILTERS if f in spec.filters)
        ),
        weights=base.weights if spec.scores is None else spec.scores,
        spread_by=base.spread_by if spec.spread_by is None else spec.spread_by,
        prefer_labels=base.prefer_labels if spec.prefer_labels is None else spec.prefer_labels,
        avoid_labels=base.avoid_labels if spec.avoid_labels is None else spec.avoid_labels,
        max_loads_per_node=(
            base.max_loads_per_node if spec.max_loads_per_node is None else spec.max_loads_per_node
        ),
        eviction=base.eviction if spec.eviction is None else spec.eviction,
    )


@dataclass(frozen=True, eq=False)
class Policy:
    """A validated policy, every rule already resolved. Build it with :func:`parse_policy`."""

    spec: PolicySpec
    source_yaml: str
    default: Rule = field(init=False)
    rules: tuple[Rule, ...] = field(init=False)
    _cache: dict[tuple[str, frozenset[tuple[str, str]]], Rule] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        default = _resolve(self.spec.default or RuleSpec(), DEFAULT_RULE, f"{self.name}: default")
        specs = self.spec.rules or ()
        rules = tuple(_resolve(r, default, f"{self.name}: rules[{i}]") for i, r in enumerate(specs))
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "rules", rules)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description or ""

    def rule_for(self, spec: SpecLike) -> Rule:
        """The rule of the first rule entry matching ``spec``, else the policy default."""
        selector = spec.node_selector
        key = (spec.name, frozenset(selector.items()))
        rule = self._cache.get(key)
        if rule is None:
            rule = self.default
            for match, resolved in zip(self.spec.rules or (), self.rules, strict=True):
                if match.matches(spec.name, selector):
                    rule = resolved
                    break
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = rule
        return rule


DEFAULT_POLICY: Final = Policy(spec=PolicySpec(name="built-in"), source_yaml="name: built-in\n")


# --------------------------------------------------------------------------- parsing


def _compose(text: str) -> tuple[yaml.Node, Any]:
    """The node tree and the data of a single YAML document (one parse for both)."""
    try:  # the reader checks the characters as soon as it is made
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise PolicyError("the policy file is empty")
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise PolicyError(
            f"invalid YAML: {what or 'syntax error'}", mark.line + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid YAML: {exc}") from None
    except PolicyError:
        raise
    except RecursionError:  # the composer recurses once per nesting level
        raise PolicyError(f"invalid YAML: nested more than {_MAX_DEPTH} levels deep") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a tagged scalar that does not convert
        raise PolicyError(f"invalid YAML value: {exc}") from None
    finally:
        loader.dispose()
    return node, data


def _check_tree(root: yaml.Node) -> None:
    """Reject duplicate keys (YAML keeps the last silently), alias bombs and deep nesting."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int = 1) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        if depth > _MAX_DEPTH:
            raise PolicyError(
                f"nested more than {_MAX_DEPTH} levels deep", node.start_mark.line + 1
            )
        sizes[id(node)] = 1  # cycles (recursive aliases) count once
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise PolicyError(f"duplicate key {key.value!r}", key.start_mark.line + 1)
                    seen.add(key.value)
                total += size(key, depth + 1) + size(value, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item, depth + 1) for item in node.value)
        if total > _MAX_EXPANDED_NODES:
            raise PolicyError(
                f"document too large: more than {_MAX_EXPANDED_NODES} nodes once aliases "
                "are expanded",
                node.start_mark.line + 1,
            )
        sizes[id(node)] = total
        return total

    size(root)


def _locate(root: yaml.Node, loc: tuple[int | str, ...], key_wanted: bool) -> tuple[int, str]:
    """The 1-based line of the deepest node on ``loc`` and the dotted path of ``loc``.

    The line is the key node's when ``key_wanted`` (or the error is about a mapping key),
    else the value node's; a step the tree lacks (a missing key) leaves the parent's.
    """
    node: yaml.Node | None = root
    target = root
    path = ""
    for i, step in enumerate(loc):
        if step == "[key]":  # the error is about the key just stepped to
            continue
        in_list = isinstance(node, yaml.SequenceNode) and isinstance(step, int)
        path += f"[{step}]" if in_list else (f".{step}" if path else str(step))
        if isinstance(node, yaml.MappingNode):
            pair = next(
                ((k, v) for k, v in node.value if str(getattr(k, "value", None)) == str(step)),
                None,
            )
            if pair is None:
                node = None
                continue
            key, node = pair
            at_key = key_wanted or (i + 1 < len(loc) and loc[i + 1] == "[key]")
            target = key if at_key else node
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if not 0 <= step < len(node.value):
                node = None
                continue
            node = node.value[step]
            target = node
        else:
            node = None
    return int(target.start_mark.line) + 1, path


def _message(err: ErrorDetails) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden" and len(loc) >= 3 and loc[-3] == "eviction":
        return f"unknown parameter {str(loc[-1])!r} of eviction plugin {loc[-2]!r}"
    if kind == "extra_forbidden":
        return f"unknown field {str(loc[-1])!r}" if loc else "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":  # the only tagged union is the eviction step
        tag = (err.get("ctx") or {}).get("tag", "")
        return f"unknown eviction plugin {tag!r}; known: {', '.join(EVICTIONS)}"
    if kind == "union_tag_not_found":
        return f"the eviction step needs 'plugin': one of {', '.join(EVICTIONS)}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _untag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """``loc`` without the plugin tag pydantic adds after ``eviction`` (not a key of the file)."""
    return tuple(
        step
        for i, step in enumerate(loc)
        if not (i > 0 and loc[i - 1] == "eviction" and step in EVICTIONS)
    )


def _error(root: yaml.Node, exc: ValidationError) -> PolicyError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = _untag(tuple(first["loc"]))
    if first["type"] == "union_tag_invalid":
        loc += ("plugin",)  # point at the name, not at the mapping holding it
    line, path = _locate(root, loc, key_wanted=first["type"] in {"extra_forbidden", "missing"})
    reason = f"{path}: {_message(first)}" if path else _message(first)
    if len(errors) > 1:
        more = len(errors) - 1
        reason += f" (and {more} more error{'s' if more > 1 else ''})"
    return PolicyError(reason, line)


def parse_policy(text: str) -> Policy:
    """Parse and validate a policy file; raises :class:`PolicyError` on any problem."""
    if len(text.encode("utf-8", errors="surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError(f"the policy file is larger than {MAX_POLICY_BYTES // 1024} KiB")
    root, data = _compose(text)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PolicyError(
            f"the policy must be a YAML mapping (name:, default:, rules:), not {kind}",
            root.start_mark.line + 1,
        )
    _check_tree(root)
    try:
        spec = PolicySpec.model_validate(data)
    except ValidationError as exc:
        raise _error(root, exc) from None
    return Policy(spec=spec, source_yaml=text)
