"""What users send to the Admin API, checked before anything reaches etcd or a node.

Contract:

* Every function is pure: no I/O, no clock, no snapshot. It returns (``validate_spec``: a
  normalised copy) or raises :class:`~meshserve.common.errors.InvalidArgument` with a message
  that names the field, the value and the rule, so a user can act on it. It never raises
  anything else, whatever the message holds (NaN, infinities, huge counts, odd text).
* Checks that need the mesh's state (is the model registered? is the node linked?) are not
  here: the servicer makes them against its snapshot, after these.

Why here, beside ``admin.py`` rather than in a room: this is the Admin API's input contract, and
it spans every room's vocabulary (model specs, drift profiles, feedback, aliases, SLO queries);
no room owns it, and only the Admin servicer (and its tests) read it.
"""

from __future__ import annotations

import math
import re
import urllib.parse

from meshserve.common.datatypes import DATATYPES
from meshserve.common.errors import InvalidArgument
from meshserve.common.policy.config import Policy, PolicyError, parse_policy
from meshserve.common.sketches import MAX_CLASSES, MAX_FEATURES
from meshserve.protos import mesh_pb2

__all__ = [
    "MAX_COPIES",
    "MAX_FEEDBACK_ITEMS",
    "MAX_PROFILE_BINS",
    "NAME",
    "check_model_name",
    "check_name",
    "validate_alias_change",
    "validate_feedback",
    "validate_node_labels",
    "validate_policy",
    "validate_profile",
    "validate_rollout",
    "validate_spec",
    "validate_switching",
]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # models, variants, aliases
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The artifact URI schemes a node fetches (meshserve.node.transfer.SCHEMES; a unit test pins them).
_ARTIFACT_SCHEMES = frozenset(
    {"file", "http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
)
MAX_COPIES = 1000
MAX_FEEDBACK_ITEMS = 10_000
MAX_PROFILE_BINS = 64


def check_name(what: str, value: str) -> None:
    """InvalidArgument unless ``value`` is a valid name; the message says ``what`` it is
    (e.g. ``"model name"``, ``"alias name"``) and the rule."""
    if not NAME.match(value):
        raise InvalidArgument(
            f"invalid {what} {value!r}: 1-128 of [A-Za-z0-9_.-], starting with a letter or digit"
        )


def check_model_name(name: str) -> None:
    """InvalidArgument unless ``name`` is a valid model name (the short message of the calls that
    only name a model: RemoveModel, ListAliases)."""
    if not NAME.match(name):
        raise InvalidArgument(f"invalid model name {name!r}")


_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # as a node's Hello names it
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
MAX_NODE_LABELS = 64


def validate_node_labels(request: mesh_pb2.LabelNodeRequest) -> None:
    """InvalidArgument unless ``request`` names a valid node id and changes at least one label,
    each key 1-63 of [A-Za-z0-9_./-] and each value 1-63 of [A-Za-z0-9_.:-] (a letter or digit
    first), no key both set and removed, at most MAX_NODE_LABELS keys."""
    if not _NODE_ID.match(request.node_id):
        raise InvalidArgument(f"invalid node id {request.node_id!r}")
    if not request.set and not request.remove:
        raise InvalidArgument("nothing to change: give KEY=VALUE labels to set or keys to remove")
    if len(request.set) + len(request.remove) > MAX_NODE_LABELS:
        raise InvalidArgument(f"at most {MAX_NODE_LABELS} labels per node")
    for key in [*request.set, *request.remove]:
        if not _LABEL_KEY.match(key):
            raise InvalidArgument(
                f"invalid label key {key!r}: 1-63 of [A-Za-z0-9_./-], "
                "starting with a letter or digit"
            )
    for key, value in request.set.items():
        if not _LABEL_VALUE.match(value):
            raise InvalidArgument(
                f"invalid value {value!r} of label {key!r}: 1-63 of [A-Za-z0-9_.:-], starting "
                "with a letter or digit (remove a label with --remove KEY)"
            )
    both = sorted(set(request.set) & set(request.remove))
    if both:
        raise InvalidArgument(f"labels both set and removed: {', '.join(both)}")


def validate_spec(spec: mesh_pb2.ModelSpec) -> mesh_pb2.ModelSpec:
    """A normalised copy of ``spec`` (variant: as given, else the version's name, else
    ``default``; lower-case sha256; at least one copy), or InvalidArgument saying what is wrong.
    ``spec`` itself is not changed. A spec without a version belongs to the model's implicit
    version ``default``."""
    out = mesh_pb2.ModelSpec()
    out.CopyFrom(spec)
    out.variant = out.variant or out.version or "default"
    if out.version:
        check_name("model version", out.version)
    out.sha256 = out.sha256.lower()
    out.copies = out.copies or 1
    check_name("model name", out.name)
    check_name("model variant", out.variant)
    scheme = urllib.parse.urlparse(out.artifact_uri).scheme
    if scheme not in _ARTIFACT_SCHEMES:
        raise InvalidArgument(
            f"artifact_uri {out.artifact_uri!r} must be a file://, http:// or https:// URI, "
            "or an object store's (s3://, gs://, az://; the node needs the backend installed)"
        )
    if not _SHA256.match(out.sha256):
        raise InvalidArgument(f"sha256 {spec.sha256!r} is not 64 hex characters")
    if out.copies > MAX_COPIES:
        raise InvalidArgument(f"copies={out.copies} is over the limit of {MAX_COPIES}")
    for tensor in [*out.inputs, *out.outputs]:
        if tensor.datatype not in DATATYPES:
            raise InvalidArgument(f"tensor {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if not (math.isfinite(out.slo_ms) and out.slo_ms >= 0):
        raise InvalidArgument(f"slo_ms={out.slo_ms} must be a finite number >= 0")
    if not (math.isfinite(out.accuracy) and 0 <= out.accuracy <= 1):
        raise InvalidArgument(f"accuracy={out.accuracy} must be between 0 and 1")
    if out.HasField("autoscaling"):
        _check_autoscaling(out.autoscaling)
    monitoring = out.serving.monitoring
    if not (math.isfinite(monitoring.log_sample_rate) and 0 <= monitoring.log_sample_rate <= 1):
        raise InvalidArgument(
            f"monitoring.log_sample_rate={monitoring.log_sample_rate} must be between 0 and 1"
        )
    if out.HasField("drift_reference"):
        validate_profile(out.drift_reference)
    return out


def _check_autoscaling(scale: mesh_pb2.Autoscaling) -> None:
    if scale.max_copies > MAX_COPIES:
        raise InvalidArgument(f"autoscaling.max_copies={scale.max_copies} is over {MAX_COPIES}")
    if scale.max_copies and scale.min_copies > scale.max_copies:
        raise InvalidArgument(
            f"autoscaling.min_copies={scale.min_copies} exceeds max_copies={scale.max_copies}"
        )
    if not scale.target_in_flight >= 0:  # NaN is refused too
        raise InvalidArgument("autoscaling.target_in_flight must be >= 0")


def validate_profile(profile: mesh_pb2.DriftProfile) -> None:
    """InvalidArgument unless ``profile`` is a well-formed, bounded drift reference: at most
    ``MAX_FEATURES`` features (and then an input tensor named), every sketch with fewer than
    ``MAX_PROFILE_BINS`` finite, strictly increasing edges and one count per bin."""
    if len(profile.features) > MAX_FEATURES:
        raise InvalidArgument(
            f"drift profile has {len(profile.features)} features; at most {MAX_FEATURES}"
        )
    if profile.features and not profile.input:
        raise InvalidArgument("drift profile has features but names no input tensor")
    for sketch in [*profile.features, profile.output]:
        edges = list(sketch.edges)
        if len(edges) >= MAX_PROFILE_BINS or len(sketch.counts) > MAX_CLASSES + MAX_PROFILE_BINS:
            raise InvalidArgument(f"drift profile sketch {sketch.name!r} has too many bins")
        if not all(math.isfinite(e) for e in edges) or edges != sorted(set(edges)):
            raise InvalidArgument(
                f"drift profile sketch {sketch.name!r}: edges must be finite and increasing"
            )
        if edges and len(sketch.counts) != len(edges) + 1:
            raise InvalidArgument(
                f"drift profile sketch {sketch.name!r}: {len(edges)} edges need "
                f"{len(edges) + 1} counts, got {len(sketch.counts)}"
            )


def validate_policy(text: str) -> Policy:
    """The parsed policy, or InvalidArgument ``invalid policy: <what the parser found>``."""
    try:
        return parse_policy(text)
    except PolicyError as exc:
        raise InvalidArgument(f"invalid policy: {exc}") from None


def validate_feedback(request: mesh_pb2.FeedbackRequest) -> None:
    """InvalidArgument unless ``request`` names a model and carries 1..``MAX_FEEDBACK_ITEMS``
    items, each with a request id and a label or a finite value."""
    if not request.model:
        raise InvalidArgument("feedback needs the model name")
    if not request.items:
        raise InvalidArgument("feedback has no items")
    if len(request.items) > MAX_FEEDBACK_ITEMS:
        raise InvalidArgument(
            f"{len(request.items)} feedback items; send at most {MAX_FEEDBACK_ITEMS} per call"
        )
    for item in request.items:
        if not item.request_id:
            raise InvalidArgument("a feedback item has an empty request_id")
        if item.WhichOneof("truth") is None:
            raise InvalidArgument(f"feedback for {item.request_id!r} carries no label or value")
        if item.WhichOneof("truth") == "value" and not math.isfinite(item.value):
            raise InvalidArgument(f"feedback for {item.request_id!r}: value is not finite")


def validate_switching(slo_ms: float, min_accuracy: float) -> None:
    """InvalidArgument unless the SLO of an ExplainSwitching query is finite and >= 0."""
    for name, value in (("slo_ms", slo_ms), ("min_accuracy", min_accuracy)):
        if not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {value}")


def validate_alias_change(model: str, alias: str) -> None:
    """InvalidArgument unless ``model`` and ``alias`` are valid names (Rollback; Rollout)."""
    check_name("model name", model)
    check_name("alias name", alias)


def validate_rollout(model: str, alias: str, version: str) -> None:
    """InvalidArgument unless the rollout names a version and valid model and alias names."""
    if not version:
        raise InvalidArgument("rollout needs the version to roll out (a registered version)")
    validate_alias_change(model, alias)
