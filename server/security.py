"""Who may talk to the server, and over what: TLS credentials, the bearer token, and the
warnings an operator must see when the port is exposed (docs/SECURITY.md)."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

import grpc

from clipsearch.server.errors import ConfigurationError
from clipsearch.server.settings import Settings

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


class ListenError(OSError):
    """The server cannot listen on its address (the port is taken, the address is not ours)."""


def _read(setting: str, path: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{setting} {path!r}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ConfigurationError(f"{setting} {path!r} is empty")
    return data


def _read_pem(setting: str, path: str) -> bytes:
    data = _read(setting, path)
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{setting} {path!r} is not a PEM file")
    return data


def bearer_token(settings: Settings) -> str:
    """The token every call must carry ('' when auth is off): `auth_token`, or the first
    line of `auth_token_file`."""
    if not settings.auth_token_file:
        return settings.auth_token
    text = _read("auth_token_file", settings.auth_token_file).decode("utf-8", "replace")
    return text.strip().splitlines()[0].strip()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual TLS with `tls_client_ca`), or None for plaintext."""
    if not settings.tls:
        return None
    key = _read_pem("tls_key", settings.tls_key)
    chain = _read_pem("tls_cert", settings.tls_cert)
    client_ca = (
        _read_pem("tls_client_ca", settings.tls_client_ca) if settings.tls_client_ca else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(settings: Settings, token: str) -> str | None:
    """One line for the log when the port is reachable from other machines without the
    protection it needs; None on loopback, or with TLS and (a token or client certificates)."""
    if is_loopback(settings.host):
        return None
    where = f"listening on {settings.host}:{settings.port}"
    if not settings.tls and not token:
        return (
            f"{where} WITHOUT TLS OR A TOKEN: anyone who can reach this port can read, write "
            "and drop every collection (set --auth-token-file and --tls-cert/--tls-key; "
            "docs/SECURITY.md)"
        )
    if not settings.tls:
        return (
            f"{where} without TLS: the token and all data cross the network in clear text "
            "(set --tls-cert/--tls-key; docs/SECURITY.md)"
        )
    if not token and not settings.tls_client_ca:
        return (
            f"{where} with TLS but no token or client certificates: anyone who can reach "
            "this port can read, write and drop every collection (docs/SECURITY.md)"
        )
    return None


def check_port_free(host: str, port: int) -> None:
    """Raise ListenError if host:port is taken by any socket.

    gRPC binds with SO_REUSEPORT unless told otherwise (the server turns it off), and when
    a bind fails it logs a C-level line and raises a RuntimeError that does not say why;
    binding a plain socket first gives the reason in one line."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return  # gRPC resolves the address itself and reports its own error
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(
                        f"cannot listen on {host}:{port}: address already in use "
                        "(another clipsearch serve or another program holds the port)",
                    ) from None
                # Other bind errors (an IPv6 address this host lacks) are gRPC's to judge.
