"""The errors a meshserve call raises, one class per gRPC status a user can act on.

Hierarchy::

    MeshError (= StatusError)      any failed call; ``.code`` (grpc.StatusCode), ``.message``
      InvalidArgument              INVALID_ARGUMENT: the request is malformed
      NotFound                     NOT_FOUND: no such model / version / variant / node
      ResourceExhausted            RESOURCE_EXHAUSTED: a limit is full; ``retry_after_s`` hint
      Unavailable                  UNAVAILABLE: retriable, nothing is ready to answer
      DeadlineExceeded             DEADLINE_EXCEEDED
      FailedPrecondition           FAILED_PRECONDITION
      Unauthenticated              UNAUTHENTICATED: no or wrong credential
      PermissionDenied             PERMISSION_DENIED: a known caller may not do this

Catch the base class for any failure, or one subclass for one case::

    try:
        mesh.infer("digits", inputs)
    except NotFound:
        ...
"""

from meshserve.client import MeshError
from meshserve.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StatusError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "MeshError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StatusError",
    "Unauthenticated",
    "Unavailable",
]
