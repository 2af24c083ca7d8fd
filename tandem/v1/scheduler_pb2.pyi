from tandem.v1 import edge_pb2 as _edge_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LinkEstimate(_message.Message):
    __slots__ = ("bandwidth_bps", "rtt_seconds", "spectral_efficiency")
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPECTRAL_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    bandwidth_bps: float
    rtt_seconds: float
    spectral_efficiency: float
    def __init__(self, bandwidth_bps: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., spectral_efficiency: _Optional[float] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("user_id", "device_class", "link", "personalized_user", "latency_budget_seconds", "energy_budget_joules", "prompt_chars")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    PERSONALIZED_USER_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_JOULES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    device_class: str
    link: LinkEstimate
    personalized_user: str
    latency_budget_seconds: float
    energy_budget_joules: float
    prompt_chars: int
    def __init__(self, user_id: _Optional[str] = ..., device_class: _Optional[str] = ..., link: _Optional[_Union[LinkEstimate, _Mapping]] = ..., personalized_user: _Optional[str] = ..., latency_budget_seconds: _Optional[float] = ..., energy_budget_joules: _Optional[float] = ..., prompt_chars: _Optional[int] = ...) -> None: ...

class PhaseSeconds(_message.Message):
    __slots__ = ("edge", "transfer", "device", "total")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    edge: float
    transfer: float
    device: float
    total: float
    def __init__(self, edge: _Optional[float] = ..., transfer: _Optional[float] = ..., device: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("plan_id", "steps", "split", "codec", "edge_address", "predicted", "predicted_quality", "predicted_energy_joules", "predicted_handoff_bytes", "meets_budget", "frame_size", "budget_infeasible", "infeasible_reason", "planned_link", "rate_source", "rtt_source")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    EDGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ENERGY_JOULES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_HANDOFF_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEETS_BUDGET_FIELD_NUMBER: _ClassVar[int]
    FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_INFEASIBLE_FIELD_NUMBER: _ClassVar[int]
    INFEASIBLE_REASON_FIELD_NUMBER: _ClassVar[int]
    PLANNED_LINK_FIELD_NUMBER: _ClassVar[int]
    RATE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RTT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    steps: int
    split: int
    codec: _edge_pb2.Codec
    edge_address: str
    predicted: PhaseSeconds
    predicted_quality: float
    predicted_energy_joules: float
    predicted_handoff_bytes: int
    meets_budget: bool
    frame_size: int
    budget_infeasible: bool
    infeasible_reason: str
    planned_link: LinkEstimate
    rate_source: str
    rtt_source: str
    def __init__(self, plan_id: _Optional[str] = ..., steps: _Optional[int] = ..., split: _Optional[int] = ..., codec: _Optional[_Union[_edge_pb2.Codec, _Mapping]] = ..., edge_address: _Optional[str] = ..., predicted: _Optional[_Union[PhaseSeconds, _Mapping]] = ..., predicted_quality: _Optional[float] = ..., predicted_energy_joules: _Optional[float] = ..., predicted_handoff_bytes: _Optional[int] = ..., meets_budget: _Optional[bool] = ..., frame_size: _Optional[int] = ..., budget_infeasible: _Optional[bool] = ..., infeasible_reason: _Optional[str] = ..., planned_link: _Optional[_Union[LinkEstimate, _Mapping]] = ..., rate_source: _Optional[str] = ..., rtt_source: _Optional[str] = ...) -> None: ...

class MeasuredPhases(_message.Message):
    __slots__ = ("queue", "edge_steps", "transfer", "device_steps", "decode")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    EDGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    queue: float
    edge_steps: float
    transfer: float
    device_steps: float
    decode: float
    def __init__(self, queue: _Optional[float] = ..., edge_steps: _Optional[float] = ..., transfer: _Optional[float] = ..., device_steps: _Optional[float] = ..., decode: _Optional[float] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("plan_id", "measured", "edge_steps", "device_steps", "handoff_bytes", "fallback")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    EDGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STEPS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_BYTES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    measured: MeasuredPhases
    edge_steps: int
    device_steps: int
    handoff_bytes: int
    fallback: bool
    def __init__(self, plan_id: _Optional[str] = ..., measured: _Optional[_Union[MeasuredPhases, _Mapping]] = ..., edge_steps: _Optional[int] = ..., device_steps: _Optional[int] = ..., handoff_bytes: _Optional[int] = ..., fallback: _Optional[bool] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("total_relative_error", "budget_violated")
    TOTAL_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    BUDGET_VIOLATED_FIELD_NUMBER: _ClassVar[int]
    total_relative_error: float
    budget_violated: bool
    def __init__(self, total_relative_error: _Optional[float] = ..., budget_violated: _Optional[bool] = ...) -> None: ...

class ReportEdgeLoadRequest(_message.Message):
    __slots__ = ("address", "queue_depth", "running_requests", "steps_per_second", "leaving", "interval_iterations", "interval_steps", "interval_busy_seconds")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    address: str
    queue_depth: int
    running_requests: int
    steps_per_second: float
    leaving: bool
    interval_iterations: int
    interval_steps: int
    interval_busy_seconds: float
    def __init__(self, address: _Optional[str] = ..., queue_depth: _Optional[int] = ..., running_requests: _Optional[int] = ..., steps_per_second: _Optional[float] = ..., leaving: _Optional[bool] = ..., interval_iterations: _Optional[int] = ..., interval_steps: _Optional[int] = ..., interval_busy_seconds: _Optional[float] = ...) -> None: ...

class ReportEdgeLoadResponse(_message.Message):
    __slots__ = ("live_edges", "ttl_seconds")
    LIVE_EDGES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    live_edges: int
    ttl_seconds: float
    def __init__(self, live_edges: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...
