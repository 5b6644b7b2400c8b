"""A throwaway PKI for TLS tests, made with the openssl CLI: a CA, a server certificate for
the DNS name `clipsearch.test` (and IP 127.0.0.1), and a client certificate, all valid for
one day."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_NAME = "clipsearch.test"
CLIENT_NAME = "client.test"
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl CLI for certificates"
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(name: str, cwd: Path, alt_names: str) -> None:
    """`name`.key/.pem signed by ca.key/ca.pem."""
    _openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
             cwd=cwd)  # fmt: skip


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / f"{SERVER_NAME}.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / f"{SERVER_NAME}.key"

    @property
    def client_cert(self) -> Path:
        return self.folder / f"{CLIENT_NAME}.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / f"{CLIENT_NAME}.key"


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=clipsearch test CA", cwd=folder)  # fmt: skip
    _issue(SERVER_NAME, folder, f"DNS:{SERVER_NAME},IP:127.0.0.1")
    _issue(CLIENT_NAME, folder, f"DNS:{CLIENT_NAME}")
    return Pki(folder)
