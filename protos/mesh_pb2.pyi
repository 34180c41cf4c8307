from meshserve.protos import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CopyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COPY_STATE_UNSPECIFIED: _ClassVar[CopyState]
    LOADING: _ClassVar[CopyState]
    READY: _ClassVar[CopyState]
    FAILED: _ClassVar[CopyState]
    UNLOADED: _ClassVar[CopyState]
COPY_STATE_UNSPECIFIED: CopyState
LOADING: CopyState
READY: CopyState
FAILED: CopyState
UNLOADED: CopyState

class Hardware(_message.Message):
    __slots__ = ("cpu_cores", "memory_bytes", "execution_providers")
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    cpu_cores: int
    memory_bytes: int
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cpu_cores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., execution_providers: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("enabled", "max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "adaptive", "latency_slo_ms", "max_queue")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    adaptive: bool
    latency_slo_ms: float
    max_queue: int
    def __init__(self, enabled: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., adaptive: _Optional[bool] = ..., latency_slo_ms: _Optional[float] = ..., max_queue: _Optional[int] = ...) -> None: ...

class ServingConfig(_message.Message):
    __slots__ = ("batching", "cache", "skip_warmup", "monitoring")
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SKIP_WARMUP_FIELD_NUMBER: _ClassVar[int]
    MONITORING_FIELD_NUMBER: _ClassVar[int]
    batching: BatchingConfig
    cache: bool
    skip_warmup: bool
    monitoring: MonitoringConfig
    def __init__(self, batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., cache: _Optional[bool] = ..., skip_warmup: _Optional[bool] = ..., monitoring: _Optional[_Union[MonitoringConfig, _Mapping]] = ...) -> None: ...

class MonitoringConfig(_message.Message):
    __slots__ = ("log_predictions", "log_sample_rate", "log_inputs", "drift_window_rows", "drift_off", "label_output")
    LOG_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOG_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    LOG_INPUTS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_WINDOW_ROWS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_OFF_FIELD_NUMBER: _ClassVar[int]
    LABEL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    log_predictions: bool
    log_sample_rate: float
    log_inputs: bool
    drift_window_rows: int
    drift_off: bool
    label_output: str
    def __init__(self, log_predictions: _Optional[bool] = ..., log_sample_rate: _Optional[float] = ..., log_inputs: _Optional[bool] = ..., drift_window_rows: _Optional[int] = ..., drift_off: _Optional[bool] = ..., label_output: _Optional[str] = ...) -> None: ...

class Sketch(_message.Message):
    __slots__ = ("name", "edges", "counts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    edges: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., edges: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class DriftProfile(_message.Message):
    __slots__ = ("input", "features", "output", "rows", "source")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    input: str
    features: _containers.RepeatedCompositeFieldContainer[Sketch]
    output: Sketch
    rows: int
    source: str
    def __init__(self, input: _Optional[str] = ..., features: _Optional[_Iterable[_Union[Sketch, _Mapping]]] = ..., output: _Optional[_Union[Sketch, _Mapping]] = ..., rows: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class DriftWindow(_message.Message):
    __slots__ = ("seq", "rows", "features", "output")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    rows: int
    features: _containers.RepeatedCompositeFieldContainer[SketchCounts]
    output: SketchCounts
    def __init__(self, seq: _Optional[int] = ..., rows: _Optional[int] = ..., features: _Optional[_Iterable[_Union[SketchCounts, _Mapping]]] = ..., output: _Optional[_Union[SketchCounts, _Mapping]] = ...) -> None: ...

class SketchCounts(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class CopyStatus(_message.Message):
    __slots__ = ("model", "variant", "state", "reason", "inputs", "outputs", "memory_bytes", "load_seconds", "sha256", "warmup_seconds", "batched", "bytes_fetched", "bytes_total", "latency_profile", "execution_provider", "monitoring_digest", "permanent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WARMUP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_PROFILE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MONITORING_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    state: CopyState
    reason: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    memory_bytes: int
    load_seconds: float
    sha256: str
    warmup_seconds: float
    batched: bool
    bytes_fetched: int
    bytes_total: int
    latency_profile: _containers.RepeatedCompositeFieldContainer[LatencyPoint]
    execution_provider: str
    monitoring_digest: str
    permanent: bool
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., state: _Optional[_Union[CopyState, str]] = ..., reason: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., memory_bytes: _Optional[int] = ..., load_seconds: _Optional[float] = ..., sha256: _Optional[str] = ..., warmup_seconds: _Optional[float] = ..., batched: _Optional[bool] = ..., bytes_fetched: _Optional[int] = ..., bytes_total: _Optional[int] = ..., latency_profile: _Optional[_Iterable[_Union[LatencyPoint, _Mapping]]] = ..., execution_provider: _Optional[str] = ..., monitoring_digest: _Optional[str] = ..., permanent: _Optional[bool] = ...) -> None: ...

class LatencyPoint(_message.Message):
    __slots__ = ("batch_size", "seconds")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    seconds: float
    def __init__(self, batch_size: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_id", "labels", "hardware", "direct_address", "version", "copies", "kind", "embedded", "tunnel_batches")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DIRECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    labels: _containers.ScalarMap[str, str]
    hardware: Hardware
    direct_address: str
    version: str
    copies: _containers.RepeatedCompositeFieldContainer[CopyStatus]
    kind: str
    embedded: _containers.RepeatedCompositeFieldContainer[EmbeddedModel]
    tunnel_batches: bool
    def __init__(self, node_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., direct_address: _Optional[str] = ..., version: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[CopyStatus, _Mapping]]] = ..., kind: _Optional[str] = ..., embedded: _Optional[_Iterable[_Union[EmbeddedModel, _Mapping]]] = ..., tunnel_batches: _Optional[bool] = ...) -> None: ...

class EmbeddedModel(_message.Message):
    __slots__ = ("model", "version", "alias")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    alias: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class ModelTelemetry(_message.Message):
    __slots__ = ("model", "variant", "in_flight", "requests", "errors", "latency_p50_ms", "latency_p99_ms", "queue_depth", "batches", "batched_rows", "max_batch_size", "cache_hits", "cache_misses", "drift", "feedback_joined", "feedback_correct", "feedback_abs_error", "predictions_logged")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_JOINED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_CORRECT_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_LOGGED_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    in_flight: int
    requests: int
    errors: int
    latency_p50_ms: float
    latency_p99_ms: float
    queue_depth: int
    batches: int
    batched_rows: int
    max_batch_size: int
    cache_hits: int
    cache_misses: int
    drift: DriftWindow
    feedback_joined: int
    feedback_correct: int
    feedback_abs_error: float
    predictions_logged: int
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., in_flight: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., queue_depth: _Optional[int] = ..., batches: _Optional[int] = ..., batched_rows: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., drift: _Optional[_Union[DriftWindow, _Mapping]] = ..., feedback_joined: _Optional[int] = ..., feedback_correct: _Optional[int] = ..., feedback_abs_error: _Optional[float] = ..., predictions_logged: _Optional[int] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("unix_ms", "cpu_percent", "rss_bytes", "memory_available_bytes", "models", "delta")
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    unix_ms: int
    cpu_percent: float
    rss_bytes: int
    memory_available_bytes: int
    models: _containers.RepeatedCompositeFieldContainer[ModelTelemetry]
    delta: bool
    def __init__(self, unix_ms: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelTelemetry, _Mapping]]] = ..., delta: _Optional[bool] = ...) -> None: ...

class TunnelRequest(_message.Message):
    __slots__ = ("correlation_id", "request", "trace_context", "timeout_ms")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    request: _inference_pb2.ModelInferRequest
    trace_context: _containers.ScalarMap[str, str]
    timeout_ms: int
    def __init__(self, correlation_id: _Optional[int] = ..., request: _Optional[_Union[_inference_pb2.ModelInferRequest, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class TunnelResponse(_message.Message):
    __slots__ = ("correlation_id", "response", "status_code", "status_message")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    response: _inference_pb2.ModelInferResponse
    status_code: int
    status_message: str
    def __init__(self, correlation_id: _Optional[int] = ..., response: _Optional[_Union[_inference_pb2.ModelInferResponse, _Mapping]] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ...) -> None: ...

class TunnelRequests(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[TunnelRequest]
    def __init__(self, frames: _Optional[_Iterable[_Union[TunnelRequest, _Mapping]]] = ...) -> None: ...

class TunnelResponses(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[TunnelResponse]
    def __init__(self, frames: _Optional[_Iterable[_Union[TunnelResponse, _Mapping]]] = ...) -> None: ...

class Draining(_message.Message):
    __slots__ = ("timeout_ms",)
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    timeout_ms: int
    def __init__(self, timeout_ms: _Optional[int] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("hello", "copy_status", "telemetry", "infer_response", "draining", "infer_answers")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    COPY_STATUS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    INFER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    INFER_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    copy_status: CopyStatus
    telemetry: Telemetry
    infer_response: TunnelResponse
    draining: Draining
    infer_answers: TunnelResponses
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., copy_status: _Optional[_Union[CopyStatus, _Mapping]] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., infer_response: _Optional[_Union[TunnelResponse, _Mapping]] = ..., draining: _Optional[_Union[Draining, _Mapping]] = ..., infer_answers: _Optional[_Union[TunnelResponses, _Mapping]] = ...) -> None: ...

class ReplicaInfo(_message.Message):
    __slots__ = ("replica_id", "address")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("replica_id", "replicas", "lease_ttl_seconds", "telemetry_interval_ms", "tunnel_batches")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    lease_ttl_seconds: int
    telemetry_interval_ms: int
    tunnel_batches: bool
    def __init__(self, replica_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ..., lease_ttl_seconds: _Optional[int] = ..., telemetry_interval_ms: _Optional[int] = ..., tunnel_batches: _Optional[bool] = ...) -> None: ...

class LoadModel(_message.Message):
    __slots__ = ("model", "variant", "artifact_uri", "sha256", "execution_providers", "serving", "placement_revision", "drift_reference", "store_id", "version", "accuracy")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_REVISION_FIELD_NUMBER: _ClassVar[int]
    DRIFT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    artifact_uri: str
    sha256: str
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    serving: ServingConfig
    placement_revision: int
    drift_reference: DriftProfile
    store_id: str
    version: str
    accuracy: float
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., artifact_uri: _Optional[str] = ..., sha256: _Optional[str] = ..., execution_providers: _Optional[_Iterable[str]] = ..., serving: _Optional[_Union[ServingConfig, _Mapping]] = ..., placement_revision: _Optional[int] = ..., drift_reference: _Optional[_Union[DriftProfile, _Mapping]] = ..., store_id: _Optional[str] = ..., version: _Optional[str] = ..., accuracy: _Optional[float] = ...) -> None: ...

class UnloadModel(_message.Message):
    __slots__ = ("model", "variant", "placement_revision", "store_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_REVISION_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    placement_revision: int
    store_id: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., placement_revision: _Optional[int] = ..., store_id: _Optional[str] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("welcome", "load", "unload", "infer_request", "feedback", "infer_batch", "replicas", "tenants")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    INFER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    INFER_BATCH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    load: LoadModel
    unload: UnloadModel
    infer_request: TunnelRequest
    feedback: FeedbackBatch
    infer_batch: TunnelRequests
    replicas: ReplicaSet
    tenants: TenantRights
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., load: _Optional[_Union[LoadModel, _Mapping]] = ..., unload: _Optional[_Union[UnloadModel, _Mapping]] = ..., infer_request: _Optional[_Union[TunnelRequest, _Mapping]] = ..., feedback: _Optional[_Union[FeedbackBatch, _Mapping]] = ..., infer_batch: _Optional[_Union[TunnelRequests, _Mapping]] = ..., replicas: _Optional[_Union[ReplicaSet, _Mapping]] = ..., tenants: _Optional[_Union[TenantRights, _Mapping]] = ...) -> None: ...

class TenantRights(_message.Message):
    __slots__ = ("enforce", "grants", "router_key_sha256")
    ENFORCE_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    enforce: bool
    grants: _containers.RepeatedCompositeFieldContainer[TenantGrant]
    router_key_sha256: bytes
    def __init__(self, enforce: _Optional[bool] = ..., grants: _Optional[_Iterable[_Union[TenantGrant, _Mapping]]] = ..., router_key_sha256: _Optional[bytes] = ...) -> None: ...

class TenantGrant(_message.Message):
    __slots__ = ("key_sha256", "tenant", "models")
    KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    key_sha256: bytes
    tenant: str
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_sha256: _Optional[bytes] = ..., tenant: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaSet(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ...) -> None: ...

class FeedbackBatch(_message.Message):
    __slots__ = ("model", "items", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[FeedbackItem]
    tenant: str
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[FeedbackItem, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class FeedbackItem(_message.Message):
    __slots__ = ("request_id", "label", "text_label", "value")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: int
    text_label: str
    value: float
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[int] = ..., text_label: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "variant", "artifact_uri", "sha256", "inputs", "outputs", "copies", "node_selector", "size_bytes", "accuracy", "serving", "execution_providers", "autoscaling", "slo_ms", "drift_reference", "registered_unix_ms", "retry_requests", "version")
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class RetryRequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    variant: str
    artifact_uri: str
    sha256: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    copies: int
    node_selector: _containers.ScalarMap[str, str]
    size_bytes: int
    accuracy: float
    serving: ServingConfig
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    autoscaling: Autoscaling
    slo_ms: float
    drift_reference: DriftProfile
    registered_unix_ms: int
    retry_requests: _containers.ScalarMap[str, int]
    version: str
    def __init__(self, name: _Optional[str] = ..., variant: _Optional[str] = ..., artifact_uri: _Optional[str] = ..., sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., copies: _Optional[int] = ..., node_selector: _Optional[_Mapping[str, str]] = ..., size_bytes: _Optional[int] = ..., accuracy: _Optional[float] = ..., serving: _Optional[_Union[ServingConfig, _Mapping]] = ..., execution_providers: _Optional[_Iterable[str]] = ..., autoscaling: _Optional[_Union[Autoscaling, _Mapping]] = ..., slo_ms: _Optional[float] = ..., drift_reference: _Optional[_Union[DriftProfile, _Mapping]] = ..., registered_unix_ms: _Optional[int] = ..., retry_requests: _Optional[_Mapping[str, int]] = ..., version: _Optional[str] = ...) -> None: ...

class Autoscaling(_message.Message):
    __slots__ = ("min_copies", "max_copies", "target_in_flight", "scale_down_delay_s")
    MIN_COPIES_FIELD_NUMBER: _ClassVar[int]
    MAX_COPIES_FIELD_NUMBER: _ClassVar[int]
    TARGET_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_DOWN_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    min_copies: int
    max_copies: int
    target_in_flight: float
    scale_down_delay_s: int
    def __init__(self, min_copies: _Optional[int] = ..., max_copies: _Optional[int] = ..., target_in_flight: _Optional[float] = ..., scale_down_delay_s: _Optional[int] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    created: bool
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ...) -> None: ...

class RemoveModelRequest(_message.Message):
    __slots__ = ("name", "variant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    variant: str
    def __init__(self, name: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class RemoveModelResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "labels", "hardware", "direct_address", "replicas", "copies", "telemetry", "draining", "reported_labels", "kind", "embedded")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ReportedLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DIRECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    REPORTED_LABELS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    labels: _containers.ScalarMap[str, str]
    hardware: Hardware
    direct_address: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    copies: _containers.RepeatedCompositeFieldContainer[CopyStatus]
    telemetry: Telemetry
    draining: bool
    reported_labels: _containers.ScalarMap[str, str]
    kind: str
    embedded: _containers.RepeatedCompositeFieldContainer[EmbeddedModel]
    def __init__(self, node_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., direct_address: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ..., copies: _Optional[_Iterable[_Union[CopyStatus, _Mapping]]] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., draining: _Optional[bool] = ..., reported_labels: _Optional[_Mapping[str, str]] = ..., kind: _Optional[str] = ..., embedded: _Optional[_Iterable[_Union[EmbeddedModel, _Mapping]]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("model", "variant", "nodes", "failed", "desired_copies", "failures")
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class FailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: CopyFailure
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[CopyFailure, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_COPIES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.ScalarMap[str, str]
    desired_copies: int
    failures: _containers.MessageMap[str, CopyFailure]
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ..., failed: _Optional[_Mapping[str, str]] = ..., desired_copies: _Optional[int] = ..., failures: _Optional[_Mapping[str, CopyFailure]] = ...) -> None: ...

class CopyFailure(_message.Message):
    __slots__ = ("reason", "permanent", "attempts", "retry_unix_ms", "sha256", "artifact_uri", "registered_unix_ms", "retry_requests")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RETRY_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    permanent: bool
    attempts: int
    retry_unix_ms: int
    sha256: str
    artifact_uri: str
    registered_unix_ms: int
    retry_requests: int
    def __init__(self, reason: _Optional[str] = ..., permanent: _Optional[bool] = ..., attempts: _Optional[int] = ..., retry_unix_ms: _Optional[int] = ..., sha256: _Optional[str] = ..., artifact_uri: _Optional[str] = ..., registered_unix_ms: _Optional[int] = ..., retry_requests: _Optional[int] = ...) -> None: ...

class ExplainPlacementRequest(_message.Message):
    __slots__ = ("model", "variant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class NodeVerdict(_message.Message):
    __slots__ = ("node_id", "feasible", "filtered_by", "reason", "score", "scores", "selected")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    FILTERED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    feasible: bool
    filtered_by: str
    reason: str
    score: float
    scores: _containers.ScalarMap[str, float]
    selected: bool
    def __init__(self, node_id: _Optional[str] = ..., feasible: _Optional[bool] = ..., filtered_by: _Optional[str] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ..., scores: _Optional[_Mapping[str, float]] = ..., selected: _Optional[bool] = ...) -> None: ...

class VariantExplanation(_message.Message):
    __slots__ = ("model", "variant", "desired_copies", "placed", "policy", "nodes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DESIRED_COPIES_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    desired_copies: int
    placed: _containers.RepeatedScalarFieldContainer[str]
    policy: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeVerdict]
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., desired_copies: _Optional[int] = ..., placed: _Optional[_Iterable[str]] = ..., policy: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeVerdict, _Mapping]]] = ...) -> None: ...

class ExplainPlacementResponse(_message.Message):
    __slots__ = ("variants",)
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[VariantExplanation]
    def __init__(self, variants: _Optional[_Iterable[_Union[VariantExplanation, _Mapping]]] = ...) -> None: ...

class ExplainSwitchingRequest(_message.Message):
    __slots__ = ("model", "slo_ms", "min_accuracy", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    slo_ms: float
    min_accuracy: float
    version: str
    def __init__(self, model: _Optional[str] = ..., slo_ms: _Optional[float] = ..., min_accuracy: _Optional[float] = ..., version: _Optional[str] = ...) -> None: ...

class VariantPrediction(_message.Message):
    __slots__ = ("variant", "accuracy", "predicted_ms", "ready_copies", "queued", "slowdown")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    READY_COPIES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    variant: str
    accuracy: float
    predicted_ms: float
    ready_copies: int
    queued: int
    slowdown: float
    def __init__(self, variant: _Optional[str] = ..., accuracy: _Optional[float] = ..., predicted_ms: _Optional[float] = ..., ready_copies: _Optional[int] = ..., queued: _Optional[int] = ..., slowdown: _Optional[float] = ...) -> None: ...

class ExplainSwitchingResponse(_message.Message):
    __slots__ = ("chosen", "reason", "slo_ms", "variants", "version", "route")
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SLO_MS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    chosen: str
    reason: str
    slo_ms: float
    variants: _containers.RepeatedCompositeFieldContainer[VariantPrediction]
    version: str
    route: str
    def __init__(self, chosen: _Optional[str] = ..., reason: _Optional[str] = ..., slo_ms: _Optional[float] = ..., variants: _Optional[_Iterable[_Union[VariantPrediction, _Mapping]]] = ..., version: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("yaml", "dry_run")
    YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    dry_run: bool
    def __init__(self, yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("revision", "name")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    revision: int
    name: str
    def __init__(self, revision: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("yaml", "revision")
    YAML_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    revision: int
    def __init__(self, yaml: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "unix_ms", "kind", "model", "variant", "node_id", "message", "replica_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    unix_ms: int
    kind: str
    model: str
    variant: str
    node_id: str
    message: str
    replica_id: str
    def __init__(self, seq: _Optional[int] = ..., unix_ms: _Optional[int] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., variant: _Optional[str] = ..., node_id: _Optional[str] = ..., message: _Optional[str] = ..., replica_id: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("limit", "kind", "model")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    limit: int
    kind: str
    model: str
    def __init__(self, limit: _Optional[int] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "undrain")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    undrain: bool
    def __init__(self, node_id: _Optional[str] = ..., undrain: _Optional[bool] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    def __init__(self, draining: _Optional[bool] = ...) -> None: ...

class NodeLabels(_message.Message):
    __slots__ = ("labels",)
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LabelNodeRequest(_message.Message):
    __slots__ = ("node_id", "set", "remove")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    set: _containers.ScalarMap[str, str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelNodeResponse(_message.Message):
    __slots__ = ("labels",)
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListPlacementsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListPlacementsResponse(_message.Message):
    __slots__ = ("placements",)
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    def __init__(self, placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("model", "items", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[FeedbackItem]
    tenant: str
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[FeedbackItem, _Mapping]]] = ..., tenant: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("accepted", "nodes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    nodes: int
    def __init__(self, accepted: _Optional[int] = ..., nodes: _Optional[int] = ...) -> None: ...

class ModelHealthRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("name", "psi", "ks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    KS_FIELD_NUMBER: _ClassVar[int]
    name: str
    psi: float
    ks: float
    def __init__(self, name: _Optional[str] = ..., psi: _Optional[float] = ..., ks: _Optional[float] = ...) -> None: ...

class VariantHealth(_message.Message):
    __slots__ = ("variant", "feedback_joined", "feedback_correct", "accuracy", "mean_abs_error", "predictions_logged", "windows", "output_psi", "max_feature_psi", "features", "drifting", "reference_source", "registered_accuracy")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_JOINED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_CORRECT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_LOGGED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PSI_FIELD_NUMBER: _ClassVar[int]
    MAX_FEATURE_PSI_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DRIFTING_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    variant: str
    feedback_joined: int
    feedback_correct: int
    accuracy: float
    mean_abs_error: float
    predictions_logged: int
    windows: int
    output_psi: float
    max_feature_psi: float
    features: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    drifting: bool
    reference_source: str
    registered_accuracy: float
    def __init__(self, variant: _Optional[str] = ..., feedback_joined: _Optional[int] = ..., feedback_correct: _Optional[int] = ..., accuracy: _Optional[float] = ..., mean_abs_error: _Optional[float] = ..., predictions_logged: _Optional[int] = ..., windows: _Optional[int] = ..., output_psi: _Optional[float] = ..., max_feature_psi: _Optional[float] = ..., features: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., drifting: _Optional[bool] = ..., reference_source: _Optional[str] = ..., registered_accuracy: _Optional[float] = ...) -> None: ...

class ModelHealthResponse(_message.Message):
    __slots__ = ("variants",)
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[VariantHealth]
    def __init__(self, variants: _Optional[_Iterable[_Union[VariantHealth, _Mapping]]] = ...) -> None: ...

class SetDriftProfileRequest(_message.Message):
    __slots__ = ("model", "variant", "profile")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    profile: DriftProfile
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., profile: _Optional[_Union[DriftProfile, _Mapping]] = ...) -> None: ...

class SetDriftProfileResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: int
    def __init__(self, features: _Optional[int] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("model", "alias", "version", "canary_version", "canary_percent", "previous_version", "updated_unix_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    version: str
    canary_version: str
    canary_percent: float
    previous_version: str
    updated_unix_ms: int
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_percent: _Optional[float] = ..., previous_version: _Optional[str] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class VersionReadiness(_message.Message):
    __slots__ = ("version", "ready", "wanted", "variants")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    ready: int
    wanted: int
    variants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., ready: _Optional[int] = ..., wanted: _Optional[int] = ..., variants: _Optional[_Iterable[str]] = ...) -> None: ...

class AliasStatus(_message.Message):
    __slots__ = ("alias", "serving", "canary_active", "reason", "versions")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    CANARY_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    alias: Alias
    serving: str
    canary_active: bool
    reason: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionReadiness]
    def __init__(self, alias: _Optional[_Union[Alias, _Mapping]] = ..., serving: _Optional[str] = ..., canary_active: _Optional[bool] = ..., reason: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionReadiness, _Mapping]]] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("model", "alias", "version", "canary_percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    version: str
    canary_percent: float
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class RolloutResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: AliasStatus
    def __init__(self, status: _Optional[_Union[AliasStatus, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "alias")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: AliasStatus
    def __init__(self, status: _Optional[_Union[AliasStatus, _Mapping]] = ...) -> None: ...

class ListAliasesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListAliasesResponse(_message.Message):
    __slots__ = ("aliases",)
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedCompositeFieldContainer[AliasStatus]
    def __init__(self, aliases: _Optional[_Iterable[_Union[AliasStatus, _Mapping]]] = ...) -> None: ...

class RetryPlacementsRequest(_message.Message):
    __slots__ = ("model", "variant", "node_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    variant: str
    node_id: str
    def __init__(self, model: _Optional[str] = ..., variant: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class RetryPlacementsResponse(_message.Message):
    __slots__ = ("retried",)
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    retried: _containers.RepeatedCompositeFieldContainer[RetriedCopy]
    def __init__(self, retried: _Optional[_Iterable[_Union[RetriedCopy, _Mapping]]] = ...) -> None: ...

class RetriedCopy(_message.Message):
    __slots__ = ("variant", "node_id", "reason", "permanent")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PERMANENT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    node_id: str
    reason: str
    permanent: bool
    def __init__(self, variant: _Optional[str] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ..., permanent: _Optional[bool] = ...) -> None: ...

class ConfirmUnloadsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfirmUnloadsResponse(_message.Message):
    __slots__ = ("held", "released", "replica_id", "confirmation")
    HELD_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATION_FIELD_NUMBER: _ClassVar[int]
    held: bool
    released: int
    replica_id: str
    confirmation: int
    def __init__(self, held: _Optional[bool] = ..., released: _Optional[int] = ..., replica_id: _Optional[str] = ..., confirmation: _Optional[int] = ...) -> None: ...

class FeedRequest(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class FeedNode(_message.Message):
    __slots__ = ("node_id", "labels", "direct_address", "replicas", "copies", "load", "draining", "hardware")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    labels: _containers.ScalarMap[str, str]
    direct_address: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    copies: _containers.RepeatedCompositeFieldContainer[CopyStatus]
    load: _containers.RepeatedCompositeFieldContainer[ModelTelemetry]
    draining: bool
    hardware: Hardware
    def __init__(self, node_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., direct_address: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ..., copies: _Optional[_Iterable[_Union[CopyStatus, _Mapping]]] = ..., load: _Optional[_Iterable[_Union[ModelTelemetry, _Mapping]]] = ..., draining: _Optional[bool] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ...) -> None: ...

class FeedEntry(_message.Message):
    __slots__ = ("key", "model", "placement", "alias", "node")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    key: str
    model: ModelSpec
    placement: Placement
    alias: Alias
    node: FeedNode
    def __init__(self, key: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., alias: _Optional[_Union[Alias, _Mapping]] = ..., node: _Optional[_Union[FeedNode, _Mapping]] = ...) -> None: ...

class FeedUpdate(_message.Message):
    __slots__ = ("revision", "full", "entries", "removed", "replica_id", "replicas", "heartbeat_ms")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    full: bool
    entries: _containers.RepeatedCompositeFieldContainer[FeedEntry]
    removed: _containers.RepeatedScalarFieldContainer[str]
    replica_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    heartbeat_ms: int
    def __init__(self, revision: _Optional[int] = ..., full: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[FeedEntry, _Mapping]]] = ..., removed: _Optional[_Iterable[str]] = ..., replica_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...

class MuxRequests(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[MuxRequest]
    def __init__(self, frames: _Optional[_Iterable[_Union[MuxRequest, _Mapping]]] = ...) -> None: ...

class MuxResponses(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[MuxResponse]
    def __init__(self, frames: _Optional[_Iterable[_Union[MuxResponse, _Mapping]]] = ...) -> None: ...

class MuxRequest(_message.Message):
    __slots__ = ("id", "request", "trace_context", "timeout_ms", "variant", "prefer")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PREFER_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: bytes
    trace_context: _containers.ScalarMap[str, str]
    timeout_ms: int
    variant: str
    prefer: str
    def __init__(self, id: _Optional[int] = ..., request: _Optional[bytes] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., timeout_ms: _Optional[int] = ..., variant: _Optional[str] = ..., prefer: _Optional[str] = ...) -> None: ...

class MuxResponse(_message.Message):
    __slots__ = ("id", "response", "status_code", "status_message")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: bytes
    status_code: int
    status_message: str
    def __init__(self, id: _Optional[int] = ..., response: _Optional[bytes] = ..., status_code: _Optional[int] = ..., status_message: _Optional[str] = ...) -> None: ...
