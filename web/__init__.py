"""`clipsearch web`: a search page and an HTTP API (JSON and OpenAI-compatible embeddings) in
front of one or more clipsearch servers, which it calls over gRPC with the project's client.

Needs the [web] extra (FastAPI, uvicorn, python-multipart, Pillow for thumbnails). The page is
plain HTML, CSS and JavaScript shipped in `static/`: no build step, nothing from a CDN.
"""
