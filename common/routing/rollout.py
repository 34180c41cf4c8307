"""Aliases and rollouts: which version of a model answers a query that follows an alias (pure).

A model has *versions* (what a rollout moves: v1, v2); a version has one or more *variants*
(faster or smaller alternatives, each with its accuracy and latency profile; SLO switching
chooses among the variants of the version a query resolves to, see :mod:`.resolve`). Every
variant of every version is registered, placed, loaded and warmed as soon as it is registered.
An *alias* (``mesh_pb2.Alias``, etcd ``aliases/<model>/<alias>``) is a name that points at one
version, optionally with a *canary* version taking a share of its queries. The first version
registered becomes ``live`` (:data:`DEFAULT_ALIAS`, created with it); a later version takes no
unversioned traffic until a rollout moves ``live``. See docs/rollout.md.

Which queries follow an alias (:func:`alias_for`): one whose ``model_version`` names the alias,
and one that names nothing when the model has a ``live`` alias. Alias, version and variant names
of one model never clash (registration, :func:`check_registration`, and rollouts refuse a clash),
except that a version's default variant carries the version's name (the name selects the version).
:func:`first_live` is the ``live`` record a model's first registration writes with its spec.

Contract of :func:`resolve` (no I/O, never raises):
- The alias's ``version`` serves once it is *warm enough*: every copy its placement wants is
  READY and reachable (at least one), or it has at least as many READY copies as
  ``previous_version``. Until then ``previous_version`` keeps serving: moving an alias loads and
  warms the new copies before any traffic shifts. A fallback that is not registered any more, or
  has no READY copy, never serves; then the target does (and the gateway's usual handling of a
  version without a ready copy applies: cold start or UNAVAILABLE).
- A canary (``canary_version`` with ``canary_percent`` p in (0, 100)) takes the queries whose
  *draw* is below p, once every copy its placement wants is READY (at least one); a canary short
  of copies takes nothing (its share goes to the serving version: the safe direction).
- The draw is in [0, 100): a hash of the request id when the query has one (the same id always
  lands on the same side, whichever replica routes it), else uniform at random.

:func:`plan_rollout` and :func:`plan_rollback` compute the next alias record for the Admin API,
raising the domain errors of :mod:`meshserve.common.errors` for input a user must fix.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.protos import mesh_pb2

__all__ = [
    "DEFAULT_ALIAS",
    "IMPLICIT_VERSION",
    "Route",
    "VersionState",
    "alias_for",
    "alias_status",
    "canary_draw",
    "check_registration",
    "first_live",
    "plan_rollback",
    "plan_rollout",
    "resolve",
    "rollback_message",
    "rollout_message",
    "version_of",
    "versions_of",
]

#: The alias a query that names no version follows, when the model has it.
DEFAULT_ALIAS = "live"

#: The version of a variant registered without one (a model that never names versions has one).
IMPLICIT_VERSION = "default"


def version_of(spec: mesh_pb2.ModelSpec) -> str:
    """The version ``spec`` belongs to (:data:`IMPLICIT_VERSION` when it names none)."""
    return spec.version or IMPLICIT_VERSION


def check_registration(spec: mesh_pb2.ModelSpec, existing: Sequence[mesh_pb2.ModelSpec]) -> None:
    """InvalidArgument when registering ``spec`` (validated) beside the model's ``existing``
    variants would make a name ambiguous: variant names are unique within a model (a variant
    cannot move to another version by re-registering), and no variant of one version may carry
    the name of another version (a name in ``model_version`` selects a version before a
    variant). A variant named after its own version is the version's default variant."""
    version = version_of(spec)
    for other in existing:
        theirs = version_of(other)
        if other.variant == spec.variant and theirs != version:
            raise InvalidArgument(
                f"variant {spec.variant!r} of model {spec.name!r} belongs to version {theirs!r}; "
                f"variant names are unique within a model: give this variant of {version!r} "
                f"another name (--variant)"
            )
        if theirs != version and spec.variant == theirs:
            raise InvalidArgument(
                f"variant name {spec.variant!r} is a version of model {spec.name!r}; give the "
                "variant another name (--variant)"
            )
        if theirs != version and other.variant == version:
            raise InvalidArgument(
                f"version name {version!r} is a variant of version {theirs!r} of model "
                f"{spec.name!r}; give the version another name (--version)"
            )


def first_live(
    spec: mesh_pb2.ModelSpec, existing: Sequence[mesh_pb2.ModelSpec], now_ms: int
) -> mesh_pb2.Alias:
    """The ``live`` alias a model gets when ``spec`` is registered and it has none: the version
    already registered (a model from before aliases existed has one, implicit), else ``spec``'s
    own — the first version registered takes the queries that name none."""
    version = version_of(existing[0]) if existing else version_of(spec)
    return mesh_pb2.Alias(
        model=spec.name, alias=DEFAULT_ALIAS, version=version, updated_unix_ms=now_ms
    )


@dataclass(frozen=True, slots=True)
class VersionState:
    """What the gateway can use of one version now."""

    ready: int  # READY copies the gateway can reach
    wanted: int  # copies its placement wants

    @property
    def warm(self) -> bool:
        return self.ready >= max(1, self.wanted)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one query to an alias goes."""

    alias: str  # the alias followed
    version: str  # the version that answers this query
    serving: str  # the alias's version for non-canary queries now
    canary: bool  # this query drew the canary
    canary_active: bool  # the canary takes its share now
    reason: str


_NONE = VersionState(0, 0)


def versions_of(alias: mesh_pb2.Alias) -> set[str]:
    """The versions an alias may route to (what :func:`resolve` needs states of)."""
    return {alias.version, alias.previous_version, alias.canary_version} - {""}


def alias_for(
    aliases: Mapping[tuple[str, str], mesh_pb2.Alias], model: str, name: str
) -> mesh_pb2.Alias | None:
    """The alias a query for ``model`` naming ``name`` ("" for none) follows; None: it follows
    none (``name`` is a version or a variant, or the model has no ``live`` alias)."""
    return aliases.get((model, name or DEFAULT_ALIAS))


def _serving(alias: mesh_pb2.Alias, states: Mapping[str, VersionState]) -> tuple[str, str]:
    target = states.get(alias.version, _NONE)
    previous = alias.previous_version
    if target.warm or not previous or previous == alias.version or previous not in states:
        return alias.version, f"{alias.alias} -> {alias.version}"
    fallback = states[previous]
    if target.ready >= fallback.ready:
        return alias.version, f"{alias.alias} -> {alias.version}"
    return previous, (
        f"{alias.alias} -> {alias.version} warming ({target.ready}/{max(1, target.wanted)} "
        f"copies ready): {previous} serves"
    )


def resolve(alias: mesh_pb2.Alias, states: Mapping[str, VersionState], draw: float) -> Route:
    """The version a query to ``alias`` goes to. ``states``: the registered versions among
    :func:`versions_of` (a missing one counts as not registered); ``draw`` in [0, 100)."""
    serving, reason = _serving(alias, states)
    canary = alias.canary_version
    active = (
        bool(canary)
        and canary != serving
        and 0 < alias.canary_percent < 100
        and states.get(canary, _NONE).warm
    )
    if active and draw < alias.canary_percent:
        reason = f"{alias.alias} canary {alias.canary_percent:g}% -> {canary}"
        return Route(alias.alias, canary, serving, True, True, reason)
    if canary and not active and canary != serving:
        reason += f"; canary {canary} not ready"
    return Route(alias.alias, serving, serving, False, active, reason)


def canary_draw(request_id: str, rng: random.Random | None = None) -> float:
    """A number in [0, 100): from ``request_id`` when given (stable), else at random."""
    if request_id:
        digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 * 100.0
    return (rng or random).random() * 100.0


def alias_status(
    alias: mesh_pb2.Alias,
    states: Mapping[str, VersionState],
    variants: Mapping[str, Sequence[str]] | None = None,
) -> mesh_pb2.AliasStatus:
    """The alias with the version it serves now and each involved version's readiness (and its
    variants, from ``variants``: version -> variant names)."""
    route = resolve(alias, states, 100.0)
    out = mesh_pb2.AliasStatus(
        alias=alias, serving=route.serving, canary_active=route.canary_active, reason=route.reason
    )
    for name in sorted(versions_of(alias)):
        state = states.get(name)
        if state is not None:
            out.versions.add(
                version=name,
                ready=state.ready,
                wanted=state.wanted,
                variants=sorted((variants or {}).get(name, ())),
            )
    return out


def _check_names(
    model: str, alias: str, version: str, registered: Collection[str], variants: Collection[str]
) -> None:
    for kind, names in (("version", registered), ("variant", variants)):
        if alias in names:
            raise InvalidArgument(
                f"alias {alias!r} is also a {kind} of model {model!r} (a {kind} name selects that "
                f"{kind} directly); give the alias another name"
            )
    if version not in registered:
        names = ", ".join(sorted(registered)) or "none"
        hint = ""
        if version in variants:
            hint = f"; {version!r} is a variant: roll out the version it belongs to"
        raise NotFound(
            f"model {model!r} has no version {version!r} (has: {names}){hint}; register it "
            f"first: meshctl models register {model} --version {version} --artifact FILE"
        )


def plan_rollout(
    current: mesh_pb2.Alias | None,
    *,
    model: str,
    alias: str,
    version: str,
    canary_percent: float,
    registered: Collection[str],
    serving_now: str,
    now_ms: int,
    variants: Collection[str] = (),
) -> mesh_pb2.Alias:
    """The alias record after a rollout of ``version``: with ``canary_percent`` in (0, 100) a
    canary of the alias's current version, else the whole alias (0 and 100 alike).
    ``registered``: the model's versions; ``variants``: its variant names (an alias may not
    take one); ``serving_now``: the version answering the alias's queries now ("" for none),
    which keeps serving while ``version`` warms up, is the target of a rollback, and is the
    stable side of a canary on an alias that does not exist yet. Returns ``current`` itself
    when nothing changes."""
    if not (math.isfinite(canary_percent) and 0 <= canary_percent <= 100):
        raise InvalidArgument(f"canary percent must be between 0 and 100, got {canary_percent}")
    _check_names(model, alias, version, registered, variants)
    if 0 < canary_percent < 100:
        if (current is None or not current.version) and serving_now in registered:
            current = mesh_pb2.Alias(model=model, alias=alias, version=serving_now)
        if current is None or not current.version:
            raise FailedPrecondition(
                f"alias {alias!r} of model {model!r} points at no version yet, so there is nothing "
                f"to canary against: roll a version out first (meshctl model rollout {model} "
                f"VERSION --alias {alias})"
            )
        if version == current.version:
            raise FailedPrecondition(
                f"alias {alias!r} of model {model!r} already points at {version!r}; canary "
                "another version"
            )
        if version == current.canary_version and canary_percent == current.canary_percent:
            return current
        out = mesh_pb2.Alias()
        out.CopyFrom(current)
        out.canary_version, out.canary_percent = version, canary_percent
        out.updated_unix_ms = now_ms
        return out
    if current is not None and current.version == version and not current.canary_version:
        return current
    earlier = [serving_now]
    if current is not None:
        earlier += [current.version, current.previous_version]
    previous = next((v for v in earlier if v and v != version), "")
    return mesh_pb2.Alias(
        model=model,
        alias=alias,
        version=version,
        previous_version=previous,
        updated_unix_ms=now_ms,
    )


def plan_rollback(
    current: mesh_pb2.Alias | None,
    *,
    model: str,
    alias: str,
    registered: Collection[str],
    now_ms: int,
) -> mesh_pb2.Alias:
    """The alias record after a rollback: its canary dropped when it has one, else pointed back
    at its previous version (which then has no previous version: a second rollback does not
    flip back, and the rolled-back version is never a fallback)."""
    if current is None:
        raise NotFound(f"model {model!r} has no alias {alias!r}")
    out = mesh_pb2.Alias()
    out.CopyFrom(current)
    out.updated_unix_ms = now_ms
    if current.canary_version:
        out.canary_version, out.canary_percent = "", 0.0
        return out
    previous = current.previous_version
    if not previous:
        raise FailedPrecondition(
            f"alias {alias!r} of model {model!r} has no canary and no previous version to roll "
            f"back to (it points at {current.version!r})"
        )
    if previous not in registered:
        raise FailedPrecondition(
            f"alias {alias!r} of model {model!r}: previous version {previous!r} is no longer "
            f"registered; roll out a registered version instead (meshctl model rollout {model} "
            "VERSION)"
        )
    out.version, out.previous_version = previous, ""
    return out


def rollout_message(
    alias: str,
    version: str,
    percent: float,
    new: mesh_pb2.Alias,
    old: mesh_pb2.Alias | None,
) -> str:
    """The event text of a rollout that changed ``alias`` from ``old`` to ``new``."""
    if new.canary_version and 0 < percent < 100:
        return f"{alias}: canary {version} at {percent:g}% (stable {new.version})"
    was = old.version if old is not None else "unset"
    text = f"{alias} -> {version} (was {was})"
    if new.previous_version:
        text += f"; {new.previous_version} serves until {version} is warm"
    return text


def rollback_message(alias: str, new: mesh_pb2.Alias, old: mesh_pb2.Alias) -> str:
    """The event text of a rollback that changed ``alias`` from ``old`` to ``new``."""
    if old.canary_version:
        return f"{alias}: canary {old.canary_version} dropped; {new.version} takes every query"
    return f"{alias} -> {new.version} (rolled back from {old.version})"
