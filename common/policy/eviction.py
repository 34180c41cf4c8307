"""The eviction step of a placement policy: its plugin names and their parameters.

A variant still short of its minimum copies for lack of memory may take copies of other
variants off a node (see :mod:`meshserve.controlplane.placement.scheduler`). *Which* copies go
is a plugin, chosen and parameterised per rule from the YAML policy::

    eviction: {plugin: cheapest_reload, max_victims: 2}

Contract:

* Each plugin has one frozen parameter model here, tagged by its ``plugin`` field;
  :data:`EvictionParams` is their union, discriminated by ``plugin``. An unknown ``plugin``,
  an unknown parameter or a value out of range is a validation error of the policy file.
* The models are immutable and hashable plain data (a :class:`~meshserve.common.policy.rule.Rule`
  holds one); the plugins that act on them live in
  :mod:`meshserve.controlplane.placement.policies.plugins`.
* :data:`DEFAULT_EVICTION` is the built-in behaviour: ``cheapest_reload`` with its defaults.

Importing this module has no side effects.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_EVICTION",
    "EVICTIONS",
    "CheapestReloadParams",
    "EvictionParams",
    "NeverEvictParams",
]

# Eviction plugins (one is in force per rule).
EVICTIONS: tuple[str, ...] = (
    "cheapest_reload",  # the copies cheapest to lose: live use x reload time x size
    "never",  # no eviction: a variant short of memory waits for room
)


def _config(title: str) -> ConfigDict:
    return ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title=title,
        json_schema_extra={"required": ["plugin"]},
    )


class CheapestReloadParams(BaseModel):
    """Evict the copies cheapest to lose: (1 + in flight) x (reload s + floor) x bytes."""

    model_config = _config("cheapest_reload eviction")

    plugin: Literal["cheapest_reload"] = Field(
        default="cheapest_reload", description="The built-in eviction plugin."
    )
    unknown_reload_s: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="Reload seconds assumed for a copy the node reports no status for.",
    )
    reload_floor_s: float = Field(
        default=0.05,
        ge=0,
        allow_inf_nan=False,
        description="Added to every measured reload time (load + warm-up seconds), so a copy "
        "that reloads instantly still weighs by its use and size.",
    )
    max_victims: int | None = Field(
        default=None,
        ge=1,
        description="Most copies taken off one node for one copy of another variant; a node "
        "that would need more is not used. Unset: no bound.",
    )


class NeverEvictParams(BaseModel):
    """Never evict: a variant short of memory waits until room frees up."""

    model_config = _config("never eviction")

    plugin: Literal["never"] = Field(default="never", description="No eviction at all.")


EvictionParams = Annotated[CheapestReloadParams | NeverEvictParams, Field(discriminator="plugin")]

DEFAULT_EVICTION: Final = CheapestReloadParams()
