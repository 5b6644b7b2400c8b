"""Rules of the package itself: generated code is current, the serving path stays light, and
the real `clipsearch` entry point works on the base install (the client alone)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "protos"))
import generate  # noqa: E402  (protos/generate.py)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
ENTRY_POINT = PYPROJECT["project"]["scripts"]["clipsearch"]  # "module:function"
# What an extra brings, and gRPC: never imported to print the help.
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "PIL", "pymilvus", "tokenizers", "grpc")
# Of these packages, printing the help imports only their `commands` modules.
LIBRARIES = (
    "clipsearch.server",
    "clipsearch.client",
    "clipsearch.export",
    "clipsearch.demo",
    "clipsearch.bench",
    "clipsearch.web",
    "clipsearch.v1",
)
INSTALL_TIMEOUT_S = 240


def test_committed_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert len(fresh) == 4
    for path in fresh:
        committed = ROOT / "protos" / "clipsearch" / "v1" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale or was edited by hand: run `make proto`"
        )


def test_the_serving_path_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import clipsearch.server.app, clipsearch.server.service, clipsearch.server.encoder\n"
        "import clipsearch.server.commands, clipsearch.demo.run, clipsearch.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'optimum', 'onnx'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_libraries_import_neither_the_cli_nor_the_client() -> None:
    """The command line sits above every package: only `commands` modules import it (for
    `require`), and only the client's own users (demo, bench, web) import the client."""
    offenders = []
    for folder in ("server", "client", "export", "demo", "bench", "web", "protos"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            imported = imported_modules(path)
            if path.name != "commands.py" and any(
                name == "clipsearch.cli" or name.startswith("clipsearch.cli.") for name in imported
            ):
                offenders.append(f"{path.relative_to(ROOT)} imports clipsearch.cli")
            if folder not in ("client", "demo", "bench", "web") and any(
                name.startswith("clipsearch.client") for name in imported
            ):
                offenders.append(f"{path.relative_to(ROOT)} imports clipsearch.client")
    assert offenders == []


def test_the_entry_point_prints_help_without_importing_the_server_or_extras() -> None:
    """`clipsearch --help` and `clipsearch search --help` through the entry point named in
    pyproject.toml import no server module but the command registrations, and nothing an
    extra brings; every subcommand's help, `serve --help` included, imports no extra."""
    module, function = ENTRY_POINT.split(":")
    code = (
        "import contextlib, io, sys\n"
        f"from {module} import {function} as main\n"
        "def loaded():\n"
        f"    heavy = {HEAVY!r}\n"
        f"    libraries = {LIBRARIES!r}\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in heavy or (\n"
        "        m.startswith(libraries) and m not in libraries and not m.endswith('.commands')))\n"
        "def show_help(*command):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            main([*command, '--help'])\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (command, exc.code)\n"
        "    assert 'usage: clipsearch' in out.getvalue(), command\n"
        "show_help()\n"
        "show_help('search')\n"
        "print('client', loaded())\n"
        "for command in ('serve', 'health', 'ingest', 'export', 'demo', 'bench'):\n"
        "    show_help(command)\n"
        "print('all', sorted(m for m in loaded() if m.split('.')[0] != 'clipsearch'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.splitlines() == ["client []", "all []"]


def test_the_base_install_runs_the_client_and_names_the_extra_for_the_server(
    tmp_path: Path,
) -> None:
    """A fresh virtualenv with `pip install <repository>` and no extras: the installed
    `clipsearch` script prints its help, and `serve` says which pip line adds the server."""
    source = tmp_path / "repo"  # a copy: pip builds in the tree it is given
    ignored = [
        line.strip().strip("/")
        for line in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(".git", *ignored))
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    # The running interpreter's pip installs into the new venv (no pip bootstrap there).
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-compile", "--disable-pip-version-check", str(source)],
        check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    script = venv / "bin" / "clipsearch"

    def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in argv],
            check=False, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
        )  # fmt: skip

    installed = run(python, "-c", "import clipsearch; print(clipsearch.__file__)")
    assert "site-packages" in installed.stdout, installed
    missing = run(python, "-c", "import onnxruntime")
    assert "ModuleNotFoundError" in missing.stderr, "the base install must not bring the server"

    top = run(script, "--help")
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("usage: clipsearch") and "serve" in top.stdout
    search = run(script, "search", "--help")
    assert search.returncode == 0, search.stderr
    assert "usage: clipsearch search" in search.stdout and "--server HOST:PORT" in search.stdout
    as_module = run(python, "-m", "clipsearch", "search", "--help")
    assert (as_module.returncode, as_module.stdout) == (0, search.stdout)

    serve = run(script, "serve")
    assert serve.returncode == 2 and serve.stdout == ""
    assert serve.stderr == (
        "clipsearch serve: this command needs 'onnxruntime', which comes with the [server] "
        f"extra: pip install '{source}[server]'\n"
    )
