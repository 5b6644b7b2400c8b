"""Every limit and choice of the serving path, defined once and imported where it is needed.

Sizes are in UTF-8 bytes, which is what Milvus counts (a VARCHAR's max_length is bytes), so a
value that passes here fits the store. Imports nothing, so any module may use it.
"""

from __future__ import annotations

# --- items (the VARCHAR and JSON fields of the store's schema) ---------------------------
MAX_ID_BYTES = 512
MAX_URI_BYTES = 4096
MAX_CAPTION_BYTES = 8192
# Of the metadata as JSON with non-ASCII escaped (what Milvus stores and measures).
MAX_METADATA_BYTES = 65536
# Objects and arrays within objects and arrays; deeper metadata is refused.
MAX_METADATA_DEPTH = 64

# --- search ------------------------------------------------------------------------------
MAX_TOP_K = 1000
# Milvus refuses a search whose offset + limit is above 16384.
MAX_RESULT_WINDOW = 16384
# Fields a search may return besides id and score; an empty request means all of them.
OUTPUT_FIELDS = ("uri", "caption", "metadata")
# The search params a caller (or `--search-params`) may set, with their inclusive bounds.
# ef (HNSW) above the result window only costs memory and time; nprobe (IVF) above Milvus's
# largest nlist is meaningless; level is AUTOINDEX's accuracy knob; radius and range_filter
# bound a range search by score, a cosine. Any other param is refused.
SEARCH_PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "ef": (1, MAX_RESULT_WINDOW),
    "nprobe": (1, 65536),
    "level": (1, 5),
    "radius": (-1.0, 1.0),
    "range_filter": (-1.0, 1.0),
}
# Params Milvus reads as integers.
INTEGER_SEARCH_PARAMS = frozenset({"ef", "nprobe", "level"})

# --- filters (Milvus boolean expressions) --------------------------------------------------
# Checked before any parser runs: Milvus Lite's parser recurses per parenthesis (it fails
# near 130 levels) and takes ~0.35 ms per and/or term.
MAX_FILTER_BYTES = 65536
# Parentheses and brackets enclosing a term, plus the `not`s applying to it.
MAX_FILTER_DEPTH = 32
# `and`, `or`, `&&`, `||` in one filter (use `id in [...]` for long lists).
MAX_FILTER_BOOLEAN_OPERATORS = 256

# --- store -------------------------------------------------------------------------------
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")
METRICS = ("IP", "COSINE")


IN_MEMORY_STORE = "memory:"  # the store URI of a store in the server's memory, kept nowhere


def is_in_memory_store(uri: str) -> bool:
    return uri == IN_MEMORY_STORE


def is_milvus_lite(uri: str) -> bool:
    """A local path means Milvus Lite (embedded); a URL (http://host:19530) a Milvus server."""
    return "://" not in uri and not is_in_memory_store(uri)


# --- model -------------------------------------------------------------------------------
# Execution providers by setting name, for `--device`.
DEVICES = ("cpu", "cuda", "tensorrt")
# ONNX Runtime graph optimization levels, by setting name.
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
