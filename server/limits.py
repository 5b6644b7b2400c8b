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

# --- store -------------------------------------------------------------------------------
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")
METRICS = ("IP", "COSINE")


def is_milvus_lite(uri: str) -> bool:
    """A local path means Milvus Lite (embedded); a URL (http://host:19530) a Milvus server."""
    return "://" not in uri


# --- model -------------------------------------------------------------------------------
# Execution providers by setting name, for `--device`.
DEVICES = ("cpu", "cuda", "tensorrt")
# ONNX Runtime graph optimization levels, by setting name.
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
