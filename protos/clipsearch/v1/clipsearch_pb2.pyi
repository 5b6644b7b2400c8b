from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Target(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_UNSPECIFIED: _ClassVar[Target]
    TARGET_IMAGE: _ClassVar[Target]
    TARGET_CAPTION: _ClassVar[Target]
    TARGET_BOTH: _ClassVar[Target]

class IngestStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INGEST_STATUS_UNSPECIFIED: _ClassVar[IngestStatus]
    INGEST_STATUS_OK: _ClassVar[IngestStatus]
    INGEST_STATUS_FAILED: _ClassVar[IngestStatus]
    INGEST_STATUS_SKIPPED: _ClassVar[IngestStatus]
TARGET_UNSPECIFIED: Target
TARGET_IMAGE: Target
TARGET_CAPTION: Target
TARGET_BOTH: Target
INGEST_STATUS_UNSPECIFIED: IngestStatus
INGEST_STATUS_OK: IngestStatus
INGEST_STATUS_FAILED: IngestStatus
INGEST_STATUS_SKIPPED: IngestStatus

class Timing(_message.Message):
    __slots__ = ("queue_us", "preprocess_us", "inference_us", "search_us", "total_us", "batch_size")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    SEARCH_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    preprocess_us: int
    inference_us: int
    search_us: int
    total_us: int
    batch_size: int
    def __init__(self, queue_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., search_us: _Optional[int] = ..., total_us: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TowerInfo(_message.Message):
    __slots__ = ("precision", "providers", "max_batch_size")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    precision: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    def __init__(self, precision: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "model_family", "source_checkpoint", "dim", "context_length", "image_size", "text", "vision", "version", "versions", "store", "model_id", "timing")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_family: str
    source_checkpoint: str
    dim: int
    context_length: int
    image_size: int
    text: TowerInfo
    vision: TowerInfo
    version: str
    versions: _containers.ScalarMap[str, str]
    store: str
    model_id: str
    timing: Timing
    def __init__(self, model_name: _Optional[str] = ..., model_family: _Optional[str] = ..., source_checkpoint: _Optional[str] = ..., dim: _Optional[int] = ..., context_length: _Optional[int] = ..., image_size: _Optional[int] = ..., text: _Optional[_Union[TowerInfo, _Mapping]] = ..., vision: _Optional[_Union[TowerInfo, _Mapping]] = ..., version: _Optional[str] = ..., versions: _Optional[_Mapping[str, str]] = ..., store: _Optional[str] = ..., model_id: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class EncodeInput(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("inputs", "request_id")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[EncodeInput]
    request_id: int
    def __init__(self, inputs: _Optional[_Iterable[_Union[EncodeInput, _Mapping]]] = ..., request_id: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("vector", "truncated")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    vector: Vector
    truncated: bool
    def __init__(self, vector: _Optional[_Union[Vector, _Mapping]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings", "request_id", "error", "error_code", "timing")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    request_id: int
    error: str
    error_code: int
    timing: Timing
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., request_id: _Optional[int] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "text", "image", "vector", "like_id", "target", "top_k", "offset", "filter", "output_fields", "search_params")
    class SearchParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    LIKE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELDS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    text: str
    image: bytes
    vector: Vector
    like_id: str
    target: Target
    top_k: int
    offset: int
    filter: str
    output_fields: _containers.RepeatedScalarFieldContainer[str]
    search_params: _containers.ScalarMap[str, float]
    def __init__(self, collection: _Optional[str] = ..., text: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., like_id: _Optional[str] = ..., target: _Optional[_Union[Target, str]] = ..., top_k: _Optional[int] = ..., offset: _Optional[int] = ..., filter: _Optional[str] = ..., output_fields: _Optional[_Iterable[str]] = ..., search_params: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "uri", "caption", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    uri: str
    caption: str
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., uri: _Optional[str] = ..., caption: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "query_truncated", "timing")
    HITS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    query_truncated: bool
    timing: Timing
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., query_truncated: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class IngestOptions(_message.Message):
    __slots__ = ("collection", "create_collection", "skip_existing")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SKIP_EXISTING_FIELD_NUMBER: _ClassVar[int]
    collection: str
    create_collection: bool
    skip_existing: bool
    def __init__(self, collection: _Optional[str] = ..., create_collection: _Optional[bool] = ..., skip_existing: _Optional[bool] = ...) -> None: ...

class IngestItem(_message.Message):
    __slots__ = ("id", "image", "uri", "caption", "metadata_json", "seq")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    uri: str
    caption: str
    metadata_json: str
    seq: int
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., uri: _Optional[str] = ..., caption: _Optional[str] = ..., metadata_json: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("options", "item")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    options: IngestOptions
    item: IngestItem
    def __init__(self, options: _Optional[_Union[IngestOptions, _Mapping]] = ..., item: _Optional[_Union[IngestItem, _Mapping]] = ...) -> None: ...

class IngestAck(_message.Message):
    __slots__ = ("seq", "id", "status", "error", "error_code", "caption_truncated", "timing")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    id: str
    status: IngestStatus
    error: str
    error_code: int
    caption_truncated: bool
    timing: Timing
    def __init__(self, seq: _Optional[int] = ..., id: _Optional[str] = ..., status: _Optional[_Union[IngestStatus, str]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., caption_truncated: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "uri", "caption", "metadata_json", "image_vector", "caption_vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    IMAGE_VECTOR_FIELD_NUMBER: _ClassVar[int]
    CAPTION_VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    uri: str
    caption: str
    metadata_json: str
    image_vector: Vector
    caption_vector: Vector
    def __init__(self, id: _Optional[str] = ..., uri: _Optional[str] = ..., caption: _Optional[str] = ..., metadata_json: _Optional[str] = ..., image_vector: _Optional[_Union[Vector, _Mapping]] = ..., caption_vector: _Optional[_Union[Vector, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("collection", "ids", "include_vectors")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("items", "missing_ids", "timing")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    timing: Timing
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., missing_ids: _Optional[_Iterable[str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "timing")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    timing: Timing
    def __init__(self, deleted: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("collection", "filter")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    filter: str
    def __init__(self, collection: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count", "timing")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    count: int
    timing: Timing
    def __init__(self, count: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "exist_ok")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXIST_OK_FIELD_NUMBER: _ClassVar[int]
    name: str
    exist_ok: bool
    def __init__(self, name: _Optional[str] = ..., exist_ok: _Optional[bool] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("created", "timing")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    created: bool
    timing: Timing
    def __init__(self, created: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("name", "count", "dim", "model_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    dim: int
    model_id: str
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ..., dim: _Optional[int] = ..., model_id: _Optional[str] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections", "timing")
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    timing: Timing
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ("timing",)
    TIMING_FIELD_NUMBER: _ClassVar[int]
    timing: Timing
    def __init__(self, timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...
