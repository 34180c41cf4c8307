"""What a placement policy resolves to for one variant: the plugins in force and their weights.

A :class:`Rule` is plain immutable data. The YAML policy (:mod:`meshserve.common.policy.config`)
resolves to one per variant; the pipeline
(:mod:`meshserve.controlplane.placement.policies.pipeline`) runs its filters and scores, and the
scheduler its eviction step (:mod:`meshserve.common.policy.eviction`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshserve.common.policy.eviction import (
    DEFAULT_EVICTION,
    EVICTIONS,
    CheapestReloadParams,
    EvictionParams,
    NeverEvictParams,
)

__all__ = ["DEFAULT_RULE", "EVICTIONS", "FILTERS", "SCORES", "Rule"]

# Filter plugins, in the order they run (the first that rejects a node names the reason).
FILTERS: tuple[str, ...] = (
    "not_draining",  # the node is not being drained
    "not_failed",  # a copy of this variant has not FAILED on the node before
    "selector",  # the node carries every label of the model's node_selector
    "providers",  # the node offers every execution provider the variant requires
    "anti_affinity",  # the node carries none of the rule's avoid_labels
    "fits_memory",  # the copy's footprint fits the node's free memory
)
# Score plugins; each yields a value in [0, 1] per feasible node (higher is better).
SCORES: tuple[str, ...] = (
    "least_loaded",  # fewer copies placed and fewer queries in flight
    "bin_packing",  # fuller nodes first (pack, keep big nodes free)
    "spread",  # fewer copies of this variant in the node's spread_by domain (e.g. zone)
    "affinity",  # the node carries the rule's prefer_labels
    "demand_locality",  # the node is in the spread_by domain the demand comes from
    "load_cost",  # cheap to load there: the node's memory stays least pressed
)


def _frozen(mapping: Mapping[str, str] | Mapping[str, float] | None) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Rule:
    """The placement behaviour for one variant.

    ``filters``: names from :data:`FILTERS` to run (order is always FILTERS order).
    ``weights``: score plugin name -> weight >= 0 (missing = 0, i.e. off).
    ``spread_by``: the node label that defines a failure/topology domain (``spread``,
    ``demand_locality``); empty disables both. ``prefer_labels`` feed ``affinity``;
    ``avoid_labels`` feed ``anti_affinity``. ``eviction``: the eviction plugin (one of
    :data:`EVICTIONS`) with its parameters. ``name`` says where the rule came from (explain).
    """

    name: str = "built-in default"
    filters: tuple[str, ...] = FILTERS
    weights: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"least_loaded": 1.0, "spread": 0.5})
    )
    spread_by: str = "zone"
    prefer_labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    avoid_labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_loads_per_node: int = 2  # new copies a node is given per scheduling pass (rate limit)
    eviction: EvictionParams = DEFAULT_EVICTION

    def __post_init__(self) -> None:
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter plugin(s) {unknown}; known: {list(FILTERS)}")
        bad = [s for s in self.weights if s not in SCORES]
        if bad:
            raise ValueError(f"unknown score plugin(s) {bad}; known: {list(SCORES)}")
        negative = [s for s, w in self.weights.items() if w < 0]
        if negative:
            raise ValueError(f"score weights must be >= 0: {negative}")
        if self.max_loads_per_node < 1:
            raise ValueError("max_loads_per_node must be >= 1")
        if not isinstance(self.eviction, CheapestReloadParams | NeverEvictParams):
            raise ValueError(f"unknown eviction plugin {self.eviction!r}; known: {list(EVICTIONS)}")
        object.__setattr__(self, "weights", _frozen(self.weights))
        object.__setattr__(self, "prefer_labels", _frozen(self.prefer_labels))
        object.__setattr__(self, "avoid_labels", _frozen(self.avoid_labels))


DEFAULT_RULE = Rule()
