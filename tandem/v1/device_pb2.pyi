from tandem.v1 import edge_pb2 as _edge_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetLinkEstimateRequest(_message.Message):
    __slots__ = ("edge_address",)
    EDGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    edge_address: str
    def __init__(self, edge_address: _Optional[str] = ...) -> None: ...

class GetLinkEstimateResponse(_message.Message):
    __slots__ = ("edge_address", "bandwidth_bps", "rtt_seconds", "rate_samples", "rtt_samples")
    EDGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RATE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RTT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    edge_address: str
    bandwidth_bps: float
    rtt_seconds: float
    rate_samples: int
    rtt_samples: int
    def __init__(self, edge_address: _Optional[str] = ..., bandwidth_bps: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., rate_samples: _Optional[int] = ..., rtt_samples: _Optional[int] = ...) -> None: ...

class DeviceServiceGenerateRequest(_message.Message):
    __slots__ = ("request", "edge_address", "edge_timeout_seconds")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    EDGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EDGE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request: _edge_pb2.GenerateRequest
    edge_address: str
    edge_timeout_seconds: float
    def __init__(self, request: _Optional[_Union[_edge_pb2.GenerateRequest, _Mapping]] = ..., edge_address: _Optional[str] = ..., edge_timeout_seconds: _Optional[float] = ...) -> None: ...

class DeviceServiceGenerateResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: PhaseProgress
    result: DeviceResult
    def __init__(self, progress: _Optional[_Union[PhaseProgress, _Mapping]] = ..., result: _Optional[_Union[DeviceResult, _Mapping]] = ...) -> None: ...

class PhaseProgress(_message.Message):
    __slots__ = ("phase", "done", "total")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    phase: str
    done: int
    total: int
    def __init__(self, phase: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class DeviceResult(_message.Message):
    __slots__ = ("png", "edge_steps", "device_steps", "handoff_bytes", "seconds", "fallback", "device_pack", "link_transfer_seconds", "link_rtt_seconds")
    class SecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PNG_FIELD_NUMBER: _ClassVar[int]
    EDGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STEPS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PACK_FIELD_NUMBER: _ClassVar[int]
    LINK_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LINK_RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    edge_steps: int
    device_steps: int
    handoff_bytes: int
    seconds: _containers.ScalarMap[str, float]
    fallback: str
    device_pack: str
    link_transfer_seconds: float
    link_rtt_seconds: float
    def __init__(self, png: _Optional[bytes] = ..., edge_steps: _Optional[int] = ..., device_steps: _Optional[int] = ..., handoff_bytes: _Optional[int] = ..., seconds: _Optional[_Mapping[str, float]] = ..., fallback: _Optional[str] = ..., device_pack: _Optional[str] = ..., link_transfer_seconds: _Optional[float] = ..., link_rtt_seconds: _Optional[float] = ...) -> None: ...
