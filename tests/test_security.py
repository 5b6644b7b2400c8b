"""Security and start-up safety against real servers on port 0: TLS and mutual TLS (a CA made
in the test), the token from a file or the environment, one server per port, start-up cut
short by a signal, the embedded Milvus Lite reachable by no TCP port, and the collection
limit."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_fixtures import encode, pattern
from server_fixtures import ThreadedServer, quick_settings, served_model
from tls_fixtures import SERVER_NAME, Pki, make_pki

from clipsearch.cli import main
from clipsearch.client import Client, IngestItem, Unauthenticated, Unavailable
from clipsearch.client.channel import TlsConfig
from clipsearch.client.errors import FailedPrecondition
from clipsearch.server.app import ClipSearchServer, fake_components
from clipsearch.server.errors import ConfigurationError
from clipsearch.server.security import ListenError, exposure_warning
from clipsearch.server.settings import Settings
from clipsearch.server.store import MilvusStore
from clipsearch.server.store.lite import LiteDatabase

TOKEN = "s3cret-token"
PROCESS_TIMEOUT_S = 120.0


def fake_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "port": 0,
        "model": str(served_model()),
        "grace_period_s": 0.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def image(seed: int) -> bytes:
    return encode(pattern((40, 40), seed=seed), "PNG")


def listening_tcp_ports() -> set[int]:
    """TCP ports this process listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in (Path("/proc/self/net/tcp"), Path("/proc/self/net/tcp6")):
        with contextlib.suppress(FileNotFoundError):
            for row in table.read_text(encoding="ascii").splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI for certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    settings = quick_settings(
        tmp_path_factory.mktemp("tls") / "tls.db",
        served_model(),
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
    )
    with ThreadedServer(settings) as running:
        yield running


def server_tls(pki: Pki) -> TlsConfig:
    return TlsConfig(root_certificates=pki.ca.read_bytes(), server_name_override=SERVER_NAME)


def test_search_over_tls_end_to_end(tls_server: ThreadedServer, pki: Pki) -> None:
    with Client(tls_server.address, tls=server_tls(pki), timeout=60) as client:
        items = [IngestItem(id=f"tls-{n}", image=image(n)) for n in range(3)]
        assert client.ingest(items, collection="secure").run().ok == 3
        hits = client.search(image=image(1), collection="secure", top_k=3).hits
        assert len(hits) == 3
        assert hits[0].id == "tls-1"


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server: ThreadedServer) -> None:
    with Client(tls_server.address, retry=False, timeout=10) as plain, pytest.raises(Unavailable):
        plain.count(collection="secure")


def test_a_client_that_does_not_trust_the_server_is_refused(
    tls_server: ThreadedServer, pki: Pki
) -> None:
    untrusting = TlsConfig(root_certificates=pki.client_cert.read_bytes())  # not the CA
    client = Client(tls_server.address, tls=untrusting, retry=False, timeout=10)
    with client, pytest.raises(Unavailable):
        client.count(collection="secure")


def test_cli_commands_and_health_over_tls(
    tls_server: ThreadedServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(tls_server.address, tls=server_tls(pki), timeout=60) as client:
        client.create_collection("cli_tls", exist_ok=True)
        client.ingest([IngestItem(id="one", image=image(7))], collection="cli_tls").run()
    capsys.readouterr()
    # The server certificate names 127.0.0.1 too: no --tls-server-name needed.
    tls = ["--server", tls_server.address, "--tls-ca", str(pki.ca)]
    assert main(["count", "--collection", "cli_tls", *tls]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert main(["health", *tls]) == 0
    assert capsys.readouterr().out.strip() == f"{tls_server.address}: SERVING"
    assert main(["count", "--collection", "cli_tls", "--server", tls_server.address]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["health", "--server", tls_server.address]) == 1


def test_mutual_tls_refuses_a_client_without_a_certificate(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = fake_settings(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )
    with ThreadedServer(settings, fake_components()) as server:
        mutual = TlsConfig(
            root_certificates=pki.ca.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            server_name_override=SERVER_NAME,
        )
        with Client(server.address, tls=mutual, timeout=10) as client:
            assert client.list_collections() == []
        without_certificate = Client(server.address, tls=server_tls(pki), retry=False)
        with without_certificate, pytest.raises(Unavailable):
            without_certificate.list_collections()
        plaintext = Client(server.address, retry=False)
        with plaintext, pytest.raises(Unavailable):
            plaintext.list_collections()
        capsys.readouterr()
        cli = ["collections", "list", "--json", "--server", server.address, "--tls-ca", str(pki.ca)]
        client_pair = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        assert main([*cli, *client_pair]) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert main(cli) == 1
        assert main([*cli, "--tls-cert", str(pki.client_cert)]) == 2  # the key is missing
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"tls_key": "k.pem"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca .mutual TLS. needs tls_cert"),
        ({"auth_token": "a", "auth_token_file": "t"}, "auth_token or auth_token_file"),
        ({"max_collections": 0}, "max_collections must be > 0"),
    ],
)
def test_security_settings_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings(**changes)  # type: ignore[arg-type]


def test_unreadable_tls_and_token_files_stop_the_server_before_it_listens(
    tmp_path: Path, pki: Pki
) -> None:
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "not.pem").write_text("hello\n")
    cases = [
        ({"auth_token_file": str(tmp_path / "missing")}, "auth_token_file .*No such file"),
        ({"auth_token_file": str(tmp_path / "empty")}, "auth_token_file .* is empty"),
        (
            {"tls_cert": str(tmp_path / "not.pem"), "tls_key": str(pki.server_key)},
            "tls_cert .* is not a PEM file",
        ),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            ClipSearchServer(fake_settings(**changes), fake_components())


# --- the token -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """The real model on Milvus Lite, a token from a file, at most 3 collections."""
    settings = quick_settings(
        tmp_path_factory.mktemp("secured") / "secured.db",
        served_model(),
        auth_token_file=str(token_file),
        max_collections=3,
    )
    with ThreadedServer(settings) as running:
        yield running


def test_the_token_comes_from_a_file(secured: ThreadedServer) -> None:
    with Client(secured.address, token=TOKEN, timeout=30) as client:
        assert client.info().dim > 0
    with Client(secured.address, token=TOKEN + "x") as wrong, pytest.raises(Unauthenticated):
        wrong.info()
    with Client(secured.address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.info()


def test_cli_token_from_a_file_the_environment_or_argv(
    secured: ThreadedServer,
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("CLIPSEARCH_TOKEN", raising=False)
    monkeypatch.delenv("CLIPSEARCH_TOKEN_FILE", raising=False)
    server = ["--server", secured.address]
    assert main(["collections", "list", *server, "--token-file", str(token_file)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["collections", "list", *server]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("CLIPSEARCH_TOKEN_FILE", str(token_file))
    assert main(["collections", "list", *server]) == 0
    monkeypatch.delenv("CLIPSEARCH_TOKEN_FILE")
    monkeypatch.setenv("CLIPSEARCH_TOKEN", TOKEN)
    assert main(["collections", "list", *server]) == 0
    assert capsys.readouterr().err == ""
    # A token given on the command line works, with one warning that others can read it.
    monkeypatch.delenv("CLIPSEARCH_TOKEN")
    assert main(["collections", "list", *server, "--token", TOKEN]) == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "visible to every local user" in warning[0]


@pytest.mark.parametrize(
    ("host", "tls", "token", "client_ca", "expected"),
    [
        ("127.0.0.1", False, "", False, None),
        ("localhost", False, "", False, None),
        ("::1", False, "", False, None),
        ("0.0.0.0", False, "", False, "WITHOUT TLS OR A TOKEN"),
        ("0.0.0.0", False, "t", False, "without TLS: the token"),
        ("10.1.2.3", True, "", False, "with TLS but no token or client certificates"),
        ("0.0.0.0", True, "t", False, None),
        ("0.0.0.0", True, "", True, None),
        ("search.internal", False, "", False, "WITHOUT TLS OR A TOKEN"),
    ],
)
def test_an_exposed_port_is_logged_as_a_warning(
    host: str, tls: bool, token: str, client_ca: bool, expected: str | None
) -> None:
    files = {"tls_cert": "c", "tls_key": "k"} if tls else {}
    if client_ca:
        files["tls_client_ca"] = "ca"
    warning = exposure_warning(Settings(host=host, **files), token)  # type: ignore[arg-type]
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and expected in warning


# --- the embedded store is reachable by no TCP port ---------------------------------------


def test_milvus_lite_listens_on_no_tcp_port(tmp_path: Path) -> None:
    before = listening_tcp_ports()
    store = MilvusStore(str(tmp_path / "private.db"))
    try:
        assert listening_tcp_ports() == before
        endpoint = LiteDatabase.endpoint(str(tmp_path / "private.db"))
        assert endpoint.startswith("unix:")
        sock = Path(endpoint.removeprefix("unix:"))
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        store.create_collection("c", 8, "m")
        assert [info.name for info in store.list_collections()] == ["c"]
    finally:
        store.close()
    assert not sock.parent.exists()  # the socket's folder goes with the last store


def test_a_server_with_auth_listens_only_on_its_own_port(
    secured: ThreadedServer, tmp_path: Path
) -> None:
    # `secured` runs on Milvus Lite with a token: its store is on a unix socket.
    assert secured.port in listening_tcp_ports()
    assert LiteDatabase.endpoint(secured.settings.milvus_uri).startswith("unix:")
    before = listening_tcp_ports()
    settings = quick_settings(tmp_path / "other.db", served_model(), auth_token=TOKEN)
    with ThreadedServer(settings) as other:
        assert listening_tcp_ports() - before == {other.port}


# --- the collection limit ------------------------------------------------------------------


def test_creating_past_max_collections_fails_with_failed_precondition(
    secured: ThreadedServer,
) -> None:
    with Client(secured.address, token=TOKEN, timeout=60) as client:
        for collection in client.list_collections():
            client.drop_collection(collection.name)
        for name in ("a", "b", "c"):
            assert client.create_collection(name) is True
        with pytest.raises(FailedPrecondition, match=r"max_collections=3"):
            client.create_collection("d")
        assert client.create_collection("a", exist_ok=True) is False  # existing: allowed
        with pytest.raises(FailedPrecondition, match=r"3 collections exist"):
            client.ingest([IngestItem(id="x", image=image(3))], collection="e").run()
        assert client.ingest([IngestItem(id="x", image=image(3))], collection="a").run().ok == 1
        client.drop_collection("a")
        assert client.create_collection("d") is True
        assert sorted(c.name for c in client.list_collections()) == ["b", "c", "d"]


# --- one server per port --------------------------------------------------------------------


async def start_another(port: int) -> None:
    """Start a server on `port` (built in the running loop, as gRPC's asyncio server wants)."""
    await ClipSearchServer(fake_settings(port=port), fake_components()).start()


def test_a_second_server_on_the_same_port_fails_to_start() -> None:
    with ThreadedServer(fake_settings(), fake_components()) as first:
        with pytest.raises(ListenError, match="address already in use"):
            first.run(start_another(first.port))
        with Client(first.address, timeout=10) as client:  # the first one serves on
            assert client.list_collections() == []


def test_a_port_held_by_any_socket_fails_the_same_way() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = f"127.0.0.1:{port}: address already in use"
        running = ThreadedServer(fake_settings(), fake_components())
        with running, pytest.raises(ListenError, match=busy):
            running.run(start_another(port))


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipsearch", "serve", *args]


def test_serve_on_a_busy_port_exits_with_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            serve_command("--port", str(port), "--milvus-uri", "unused.db"),
            check=False,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT_S,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"clipsearch serve: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another clipsearch serve or another program holds the port)"
    ]


# --- start-up interrupted by a signal ---------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_non_zero_without_a_traceback(
    sig: signal.Signals,
) -> None:
    # A "Milvus" that accepts connections and never answers: start-up cannot finish, so the
    # signal surely comes before SERVING.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        milvus = f"http://127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen(
            serve_command("--port", "0", "--milvus-uri", milvus, "--auth-token", TOKEN),
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        log = []
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            log.append(line)
            if "loading the model" in line:
                break
        assert any("loading the model" in line for line in log), "".join(log)
        signalled = time.monotonic()
        process.send_signal(sig)
        rest = process.communicate(timeout=PROCESS_TIMEOUT_S)[1]
        seconds = time.monotonic() - signalled
    text = "".join(log) + rest
    assert process.returncode == 128 + sig.value, text
    assert "Traceback" not in text
    assert f"{sig.name} before the server was ready" in text
    assert seconds < 8.0, "the process waited for the store's connect timeout (10 s)"
    # And the token given on argv was warned about, once.
    assert text.count("--auth-token on the command line is visible") == 1
