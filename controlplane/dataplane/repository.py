"""Triton's model configuration and repository extensions on the gateway (pure functions).

The gateway's ``ModelConfig`` and ``RepositoryIndex`` RPCs answer from its view (a replica's
snapshot, or a standalone gateway's routing feed), like ModelMetadata and ModelReady do:

- :func:`config`: the variant a query naming that version would get
  (:func:`~meshserve.common.routing.resolve.serving_variant`: a version, an alias, a variant;
  "" the model's live one), described by :func:`meshserve.common.model_config.model_config`
  from its registered tensors, else those a ready copy reported from its ONNX file (UNAVAILABLE
  while neither is known, NOT_FOUND for an unknown model).
- :func:`index`: one entry per registered version of each model (the rollout's versions;
  ``default`` for a model registered without one), READY when the variant a query naming that
  version gets has a copy that can answer it here (ModelReady's rule), else UNAVAILABLE with the
  reason a query would get (never a load failure's details: those are for admins). Models come
  sorted by name, then version. With API keys, the tenant's filter
  (:meth:`meshserve.controlplane.auth.Guard.inference`) drops the models it may not query.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

from meshserve.common.errors import InvalidArgument, Unavailable
from meshserve.common.model_config import model_config
from meshserve.common.routing.resolve import (
    best_variant,
    candidates,
    no_copy,
    serving_variant,
    versions,
)
from meshserve.common.routing.view import Snapshot
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = ["READY", "UNAVAILABLE", "config", "index", "tensors"]

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


def tensors(
    snapshot: Snapshot, spec: mesh_pb2.ModelSpec
) -> tuple[Sequence[mesh_pb2.TensorSpec], Sequence[mesh_pb2.TensorSpec]]:
    """``spec``'s inputs and outputs: as registered, else as a ready copy reported them;
    UNAVAILABLE while neither is known."""
    if spec.inputs:
        return spec.inputs, spec.outputs
    for node in snapshot.ready_nodes((spec.name, spec.variant)):
        status = node.copies[(spec.name, spec.variant)]
        if status.inputs:
            return status.inputs, status.outputs
    raise Unavailable(f"model {spec.name!r} has no ready copy yet; its configuration is unknown")


def config(
    snapshot: Snapshot, request: inference_pb2.ModelConfigRequest, linked: Container[str]
) -> inference_pb2.ModelConfigResponse:
    """Triton's configuration of the variant ``request`` resolves to (see the module)."""
    spec = serving_variant(snapshot, request.name, request.version, linked)
    inputs, outputs = tensors(snapshot, spec)
    return inference_pb2.ModelConfigResponse(
        config=model_config(spec.name, inputs, outputs, spec.serving.batching.max_batch_size)
    )


def _state(
    snapshot: Snapshot,
    variants: Sequence[mesh_pb2.ModelSpec],
    linked: Container[str],
    fallback: bool,
) -> tuple[str, str]:
    """A version's state: that of the variant a query naming it gets (its most accurate
    variant with a candidate copy)."""
    spec = best_variant(snapshot, variants, linked)
    if candidates(snapshot, spec, linked) or (
        fallback and snapshot.ready_count((spec.name, spec.variant)) > 0
    ):
        return READY, ""
    return UNAVAILABLE, str(no_copy(snapshot, spec, linked))


def index(
    snapshot: Snapshot,
    request: inference_pb2.RepositoryIndexRequest,
    linked: Container[str],
    fallback: bool = False,
) -> inference_pb2.RepositoryIndexResponse:
    """Every model version in view and its state (see the module); ``request.ready``: only the
    READY ones. ``fallback``: a ready copy this gateway cannot reach counts (a standalone
    gateway hands such queries to a replica)."""
    if request.repository_name:
        raise InvalidArgument(
            "repository_name is not supported: the mesh is one repository (leave it empty)"
        )
    models = sorted({name for name, _ in snapshot.models})
    out = inference_pb2.RepositoryIndexResponse()
    for model in models:
        for version, variants in versions(snapshot, model).items():
            state, reason = _state(snapshot, variants, linked, fallback)
            if request.ready and state != READY:
                continue
            out.models.add(name=model, version=version, state=state, reason=reason)
    return out
