"""Reconcile for embedded members: the versions an application running models in-process holds.

An embedded member (``Hello.kind`` "embedded", see :data:`~meshserve.controlplane.snapshot.
EMBEDDED`) is never placed onto: no placement names it. What it holds follows its own Hello
instead: for each :class:`~meshserve.protos.mesh_pb2.EmbeddedModel` it declares, every variant
of one version of the model -- the pinned ``version``, else the version its ``alias`` (default
``live``) points at. A rollout or a rollback moves the alias, and so what the member is told.

Contract (pure, like :func:`~meshserve.controlplane.link.reconcile.reconcile`, whose decision
types and marks it returns, so the hub sends them the same way):

- Load every variant of the target version the member does not hold as specified (sha256 and,
  for a READY copy, the monitoring digest); the command names the variant's version and
  accuracy (the member serves the newest version it was told of, and switches among its
  variants itself).
- Make before break: a copy of another version of a declared model stays until a variant of
  the target version is READY on the member (its answers switch there at that moment); then
  it is unloaded. A copy of a model the member does not declare, or of a variant no longer
  registered, is unloaded at once.
- A model without the alias (or the pinned version) registered: nothing is loaded and nothing
  it holds is unloaded (it keeps answering with what it has, as when the control plane is
  unreachable).
- Commands carry placement revision 0 (applied in arrival order): no placement decides them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from meshserve.common.routing.resolve import versions
from meshserve.common.routing.rollout import DEFAULT_ALIAS
from meshserve.controlplane.link.reconcile import (
    UNLOAD,
    Decision,
    Unload,
    load_or_settle,
    spec_digest,
)
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["reconcile_embedded", "target_version"]


def target_version(snapshot: Snapshot, want: mesh_pb2.EmbeddedModel) -> str | None:
    """The version ``want`` should run now: its pinned version, else the one its alias points
    at, else the model's only version; None when that is not registered (nothing to do)."""
    tree = versions(snapshot, want.model)
    if want.version:
        return want.version if want.version in tree else None
    alias = snapshot.aliases.get((want.model, want.alias or DEFAULT_ALIAS))
    if alias is not None:
        return alias.version if alias.version in tree else None
    if len(tree) == 1:
        return next(iter(tree))
    return None


def reconcile_embedded(
    snapshot: Snapshot,
    wants: Sequence[mesh_pb2.EmbeddedModel],
    held: Mapping[VariantKey, mesh_pb2.CopyStatus],
    *,
    said: Mapping[VariantKey, str] | None = None,
    digest: Callable[[VariantKey, mesh_pb2.ModelSpec], str] = spec_digest,
) -> tuple[Decision, ...]:
    """The decisions that move an embedded member holding ``held`` towards the versions its
    ``wants`` (its Hello's models) resolve to in ``snapshot`` (see the module contract)."""
    said = said or {}
    decisions: list[Decision] = []
    keep: set[VariantKey] = set()  # held copies that stay
    for want in wants:
        version = target_version(snapshot, want)
        if version is None:
            keep.update(k for k in held if k[0] == want.model)
            continue
        specs = versions(snapshot, want.model)[version]
        target = {(want.model, s.variant) for s in specs}
        ready = any(
            (c := held.get(key)) is not None and c.state == mesh_pb2.READY for key in target
        )
        for spec in specs:
            key = (want.model, spec.variant)
            keep.add(key)
            decision = load_or_settle(key, spec, held.get(key), said, digest, revision=0)
            if decision is not None:
                decisions.append(decision)
        if not ready:  # make before break: the old version answers until the new one is READY
            keep.update(
                k
                for k, c in held.items()
                if k[0] == want.model and k in snapshot.models and c.state == mesh_pb2.READY
            )
    for key in held:
        if key not in keep and said.get(key) != UNLOAD:
            decisions.append(Unload(key, 0))
    return tuple(decisions)
