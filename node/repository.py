"""Triton's model configuration and repository extensions on a node's direct port.

A node answers for the copies it holds (:class:`~meshserve.node.copies.CopyManager`), as its
ModelMetadata does; a version here is a variant (the copy key), as in ModelMetadata's answer.

- :func:`config`: the READY copy a query naming that version would get, described by
  :func:`meshserve.common.model_config.model_config` from the tensors onnxruntime read from its
  ONNX file and its batcher's row cap (NOT_FOUND / UNAVAILABLE as ModelMetadata).
- :func:`index`: one entry per copy held, READY or UNAVAILABLE with the copy's state as the reason
  (never a load failure's details: callers are tenants, and those name artifacts and OS errors),
  sorted by model then version; ``visible``: the models the caller may query (the node's tenant
  rights; None: every model).
"""

from __future__ import annotations

from collections.abc import Callable

from meshserve.common.errors import InvalidArgument
from meshserve.common.model_config import model_config
from meshserve.node.copies import CopyManager
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = ["config", "index"]


def config(
    copies: CopyManager, request: inference_pb2.ModelConfigRequest
) -> inference_pb2.ModelConfigResponse:
    entry = copies.ready(request.name, request.version)
    copy = entry.copy
    assert copy is not None  # ready() returns only loaded copies
    max_batch = entry.serving.batching.max_batch_size
    return inference_pb2.ModelConfigResponse(
        config=model_config(request.name, copy.inputs, copy.outputs, max_batch)
    )


def index(
    copies: CopyManager,
    request: inference_pb2.RepositoryIndexRequest,
    visible: Callable[[str], bool] | None = None,
) -> inference_pb2.RepositoryIndexResponse:
    if request.repository_name:
        raise InvalidArgument(
            "repository_name is not supported: a node is one repository (leave it empty)"
        )
    out = inference_pb2.RepositoryIndexResponse()
    for entry in sorted(copies.entries(), key=lambda e: (e.model, e.variant)):
        if visible is not None and not visible(entry.model):
            continue
        ready = entry.state == mesh_pb2.READY and entry.copy is not None
        if request.ready and not ready:
            continue
        state = mesh_pb2.CopyState.Name(entry.state)  # type: ignore[arg-type]
        out.models.add(
            name=entry.model,
            version=entry.variant,
            state="READY" if ready else "UNAVAILABLE",
            reason="" if ready else f"the copy on this node is {state}",
        )
    return out
