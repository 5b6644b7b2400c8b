# clipsearch server image: demo model built in, Milvus Lite by default.
#   docker build -t clipsearch .
#   docker run -p 50051:50051 -v clipsearch-data:/data clipsearch
#   docker run -p 50051:50051 clipsearch --milvus-uri http://milvus:19530
# GPU: docker build --build-arg BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 \
#        --build-arg EXTRA=gpu -t clipsearch:gpu .   and run with --device cuda
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRA=server

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only images without a Python (the CUDA bases) take this step; their own apt pins the versions.
# hadolint ignore=DL3008
RUN command -v python3 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-pip python3-venv && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/clipsearch
ENV PATH=/opt/clipsearch/bin:$PATH

WORKDIR /src
# Dependencies first, in their own layer, so code and doc changes do not reinstall them: only
# pyproject.toml reaches this layer, with an empty stand-in for the package so that pip
# resolves the extra (and its clipsearch[runtime] self-reference) exactly as the real install
# would; the stand-in is uninstalled, the dependencies stay. Versions are pyproject's ranges.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN mkdir -p src/clipsearch && touch README.md src/clipsearch/__init__.py \
    && pip install ".[${EXTRA}]" && pip uninstall -y clipsearch && rm -rf /src/*

# Then the code: src/clipsearch/* are links to the top-level folders, so all of them come along.
COPY pyproject.toml README.md ./
COPY src ./src
COPY protos ./protos
COPY server ./server
COPY client ./client
COPY export ./export
COPY bench ./bench
COPY demo ./demo
COPY bulk ./bulk
COPY web ./web
RUN pip install --no-deps . && rm -rf /src

RUN useradd --create-home --uid 10001 --user-group clipsearch && mkdir /data \
    && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
EXPOSE 50051
# 0.0.0.0 so that a published port (-p) reaches the server. Without a token and TLS it logs
# a WARNING at start-up saying that anyone who can reach the port can read and drop every
# collection. Give it both (docs/SECURITY.md), e.g. with Docker secrets:
#   -e CLIPSEARCH_AUTH_TOKEN_FILE=/run/secrets/clipsearch_token
#   -e CLIPSEARCH_TLS_CERT=/run/secrets/server.pem -e CLIPSEARCH_TLS_KEY=/run/secrets/server.key
# With TLS the health check below needs CLIPSEARCH_TLS_CA (and CLIPSEARCH_TLS_SERVER_NAME
# unless the certificate names 127.0.0.1); with mutual TLS also CLIPSEARCH_TLS_CLIENT_CERT
# and CLIPSEARCH_TLS_CLIENT_KEY. Never pass the token as --auth-token: argv is world-readable.
ENV CLIPSEARCH_HOST=0.0.0.0 CLIPSEARCH_MILVUS_URI=/data/clipsearch.db
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["clipsearch", "health", "--server", "127.0.0.1:50051"]
ENTRYPOINT ["clipsearch", "serve"]
