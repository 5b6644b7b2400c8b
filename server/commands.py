"""`clipsearch serve`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from clipsearch import connection_options
from clipsearch.cli import CommandParser, require
from clipsearch.defaults import DEFAULT_ADDRESS

EXIT_SIGNALLED = 128  # serve returns 128 + N when signal N came before it was ready


def register(commands: Any) -> None:
    p: CommandParser = commands.add_parser(
        "serve",
        help="run the gRPC search server",
        description=(
            "Serve Encode, Search, Ingest and collection calls over gRPC, with health and "
            "reflection. Defaults: the committed demo model, a Milvus Lite file "
            f"./clipsearch.db, {DEFAULT_ADDRESS}. Every option can also be set by the "
            "environment variable shown; flags win. SIGINT/SIGTERM drain calls in flight "
            "and stop."
        ),
    )
    # The settings flags come from the server's Settings, imported only when `serve` parses.
    p.defer(_add_serve_arguments)
    p.set_defaults(handler=_run_serve)

    h: argparse.ArgumentParser = commands.add_parser(
        "health",
        help="ask a server's standard gRPC health service; exit 0 only when SERVING",
        description=(
            "Calls grpc.health.v1.Health/Check on --server and prints the status. Exit code 0 "
            "when SERVING, 1 otherwise (NOT_SERVING while the model warms up or the server "
            "drains, or unreachable). For container health checks and scripts."
        ),
    )
    h.add_argument(
        "--server",
        default=os.environ.get("CLIPSEARCH_SERVER", DEFAULT_ADDRESS),
        help=f"host:port (default: $CLIPSEARCH_SERVER or {DEFAULT_ADDRESS})",
    )
    h.add_argument(
        "--service", default="", help="service name to check (default: the whole server)"
    )
    h.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    connection_options.add_tls_options(h)
    h.set_defaults(handler=_run_health)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from clipsearch.server.settings import Settings

    Settings.add_arguments(parser)
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write HOST:PORT to this file once the server is SERVING (for scripts, port 0)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    require("server", "onnxruntime", "tokenizers", "PIL", "pymilvus")
    from clipsearch.server.app import configure_logging, log, serve
    from clipsearch.server.errors import ConfigurationError
    from clipsearch.server.security import ListenError
    from clipsearch.server.settings import Settings

    try:
        settings = Settings.from_args(args)
    except ConfigurationError as exc:
        print(f"clipsearch serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.auth_token:
        log.warning(
            "--auth-token on the command line is visible to every local user (ps, "
            "/proc/PID/cmdline); use --auth-token-file or $CLIPSEARCH_AUTH_TOKEN"
        )
    try:
        code = asyncio.run(serve(settings, args.ready_file))
    except ConfigurationError as exc:
        print(f"clipsearch serve: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"clipsearch serve: {exc}", file=sys.stderr)
        return 1
    if code > EXIT_SIGNALLED:
        # Stopped by a signal while starting: the model (and perhaps the store) is still
        # loading in a daemon thread, and ONNX Runtime aborts if the interpreter finalizes
        # under it. Nothing has been written yet, so leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_health(args: argparse.Namespace) -> int:
    require("server", "grpc_health")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        tls = connection_options.tls_files(args)
    except ValueError as exc:
        print(f"clipsearch health: {exc}", file=sys.stderr)
        return 2
    if tls is None:
        channel = grpc.insecure_channel(args.server)
    else:
        credentials = grpc.ssl_channel_credentials(
            tls.root_certificates, tls.private_key, tls.certificate_chain
        )
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(args.server, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.server}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.server}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
