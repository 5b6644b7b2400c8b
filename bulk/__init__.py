"""`clipsearch bulk`: encode a corpus on a Ray cluster with the bundle's ONNX towers and write
it to Milvus (or to Parquet for Milvus bulk insert). Needs the `[bulk]` extra (Ray Data); the
server never imports this package."""
