from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(_message.Message):
    __slots__ = ("encoding", "merge_ratio", "merge_strategy", "merge_window")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MERGE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MERGE_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MERGE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    merge_ratio: float
    merge_strategy: str
    merge_window: str
    def __init__(self, encoding: _Optional[str] = ..., merge_ratio: _Optional[float] = ..., merge_strategy: _Optional[str] = ..., merge_window: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "steps", "split", "sampler", "guidance_scale", "seed", "height", "width", "user", "codec")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    steps: int
    split: int
    sampler: str
    guidance_scale: float
    seed: int
    height: int
    width: int
    user: str
    codec: Codec
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., steps: _Optional[int] = ..., split: _Optional[int] = ..., sampler: _Optional[str] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., user: _Optional[str] = ..., codec: _Optional[_Union[Codec, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("queued", "progress", "handoff")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    progress: Progress
    handoff: HandoffChunk
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., handoff: _Optional[_Union[HandoffChunk, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class HandoffChunk(_message.Message):
    __slots__ = ("data", "index", "count", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    index: int
    count: int
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class GetCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCapabilitiesResponse(_message.Message):
    __slots__ = ("pack_name", "latent_channels", "vae_scale_factor", "default_image_size", "samplers", "encodings", "max_merge_ratio", "max_steps", "max_image_side", "max_prompt_chars", "max_batch_size", "max_queue", "noise_process_json", "device", "min_image_side", "max_request_cost")
    PACK_NAME_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    VAE_SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_MERGE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    NOISE_PROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_COST_FIELD_NUMBER: _ClassVar[int]
    pack_name: str
    latent_channels: int
    vae_scale_factor: int
    default_image_size: int
    samplers: _containers.RepeatedScalarFieldContainer[str]
    encodings: _containers.RepeatedScalarFieldContainer[str]
    max_merge_ratio: float
    max_steps: int
    max_image_side: int
    max_prompt_chars: int
    max_batch_size: int
    max_queue: int
    noise_process_json: str
    device: str
    min_image_side: int
    max_request_cost: int
    def __init__(self, pack_name: _Optional[str] = ..., latent_channels: _Optional[int] = ..., vae_scale_factor: _Optional[int] = ..., default_image_size: _Optional[int] = ..., samplers: _Optional[_Iterable[str]] = ..., encodings: _Optional[_Iterable[str]] = ..., max_merge_ratio: _Optional[float] = ..., max_steps: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_prompt_chars: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., noise_process_json: _Optional[str] = ..., device: _Optional[str] = ..., min_image_side: _Optional[int] = ..., max_request_cost: _Optional[int] = ...) -> None: ...
