from nextserve.v1 import engine_pb2 as _engine_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepPlan(_message.Message):
    __slots__ = ("step_id", "sequences", "new_requests", "finished_request_ids", "shutdown")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    NEW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    sequences: _containers.RepeatedCompositeFieldContainer[ScheduledSequence]
    new_requests: _containers.RepeatedCompositeFieldContainer[_engine_pb2.AddRequest]
    finished_request_ids: _containers.RepeatedScalarFieldContainer[str]
    shutdown: bool
    def __init__(self, step_id: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[ScheduledSequence, _Mapping]]] = ..., new_requests: _Optional[_Iterable[_Union[_engine_pb2.AddRequest, _Mapping]]] = ..., finished_request_ids: _Optional[_Iterable[str]] = ..., shutdown: bool = ...) -> None: ...

class ScheduledSequence(_message.Message):
    __slots__ = ("request_id", "token_ids", "start_position", "block_table", "state_group", "num_accepted_slot", "is_decode", "sample", "next_token_id", "appended_blocks", "reset_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    STATE_GROUP_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_SLOT_FIELD_NUMBER: _ClassVar[int]
    IS_DECODE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    APPENDED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESET_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    state_group: int
    num_accepted_slot: int
    is_decode: bool
    sample: bool
    next_token_id: int
    appended_blocks: _containers.RepeatedScalarFieldContainer[int]
    reset_blocks: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., state_group: _Optional[int] = ..., num_accepted_slot: _Optional[int] = ..., is_decode: bool = ..., sample: bool = ..., next_token_id: _Optional[int] = ..., appended_blocks: _Optional[_Iterable[int]] = ..., reset_blocks: bool = ...) -> None: ...
