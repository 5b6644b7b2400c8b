"""The command line's options for reaching a server safely: TLS files and the bearer token.

Shared by the client commands and `clipsearch health` (argparse and file reading only; no
gRPC). Every option has an environment default. The client's variables are named apart from
the server's (`CLIPSEARCH_TLS_CLIENT_CERT`, not the server's `CLIPSEARCH_TLS_CERT`), so a
health check run inside the server's container does not present the server's own
certificate.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "CLIPSEARCH_TOKEN"
TOKEN_FILE_ENV = "CLIPSEARCH_TOKEN_FILE"
TLS_ENV = "CLIPSEARCH_TLS"
TLS_CA_ENV = "CLIPSEARCH_TLS_CA"
TLS_CERT_ENV = "CLIPSEARCH_TLS_CLIENT_CERT"
TLS_KEY_ENV = "CLIPSEARCH_TLS_CLIENT_KEY"
TLS_SERVER_NAME_ENV = "CLIPSEARCH_TLS_SERVER_NAME"
TOKEN_ON_COMMAND_LINE = (
    "warning: a --token on the command line is visible to every local user (ps, "
    f"/proc/PID/cmdline); use --token-file or ${TOKEN_ENV}"
)


@dataclass(frozen=True)
class TlsFiles:
    """PEM contents read from the TLS options; the client's `TlsConfig` takes them as is."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None


class _TokenOnCommandLine(argparse.Action):
    """Stores --token and notes that it came from argv (world-readable in /proc)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.token_on_command_line = True


def add_tls_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    env = os.environ
    parser.add_argument(
        "--tls",
        action="store_true",
        default=env.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on"),
        help=f"connect over TLS, trusting the system's root certificates (default: ${TLS_ENV}); "
        "implied by the other --tls-* options",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=env.get(TLS_CA_ENV) or None,
        help=f"trust the server certificates this CA bundle signed (default: ${TLS_CA_ENV})",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=env.get(TLS_CERT_ENV) or None,
        help=f"client certificate for mutual TLS, with --tls-key (default: ${TLS_CERT_ENV})",
    )
    parser.add_argument(
        "--tls-key",
        metavar="PEM",
        default=env.get(TLS_KEY_ENV) or None,
        help=f"private key of --tls-cert (default: ${TLS_KEY_ENV})",
    )
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=env.get(TLS_SERVER_NAME_ENV) or None,
        help="check the server certificate against this name instead of the host of "
        f"--server (an IP address, a test CA; default: ${TLS_SERVER_NAME_ENV})",
    )


def add_token_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--token",
        action=_TokenOnCommandLine,
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token for a server started with a token (default: ${TOKEN_ENV}); "
        "prefer --token-file: argv is visible to other local users",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=None,
        help=f"read the bearer token from this file (default: ${TOKEN_FILE_ENV})",
    )


def _read(option: str, path: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{option} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ValueError(f"{option} {path} is empty")
    return data


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS the options ask for (None: plaintext). ValueError names a bad file."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS needs both)")
    wanted = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    if not wanted:
        return None
    return TlsFiles(
        root_certificates=_read("--tls-ca", args.tls_ca) if args.tls_ca else None,
        certificate_chain=_read("--tls-cert", args.tls_cert) if args.tls_cert else None,
        private_key=_read("--tls-key", args.tls_key) if args.tls_key else None,
        server_name=args.tls_server_name,
    )


def bearer_token(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str | None:
    """--token, else --token-file, else $CLIPSEARCH_TOKEN (the default of --token), else
    the file $CLIPSEARCH_TOKEN_FILE names."""
    env = os.environ if env is None else env
    if token_on_command_line(args):
        return str(args.token)
    if args.token_file:
        return _first_line("--token-file", args.token_file)
    if args.token:
        return str(args.token)
    path = env.get(TOKEN_FILE_ENV)
    return _first_line(TOKEN_FILE_ENV, path) if path else None


def _first_line(option: str, path: str) -> str:
    return _read(option, path).decode("utf-8", "replace").strip().splitlines()[0].strip()


def token_on_command_line(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "token_on_command_line", False))
