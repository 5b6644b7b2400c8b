"""One import identity: the package imports as clipsearch.* only, never by the bare names of
the top-level folders it is made of (src/clipsearch/* are links to them). Two identities
would mean two copies of every module: `server.errors.NotFound` is not
`clipsearch.server.errors.NotFound`, so an `except` on one silently misses the other."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import clipsearch

ROOT = Path(__file__).resolve().parents[1]
LINKS = {p.name: p.resolve() for p in (ROOT / "src" / "clipsearch").iterdir() if p.is_symlink()}
LINKS = {name: target for name, target in LINKS.items() if target.is_dir()}
# The top-level folders the package is made of, and src/ itself: by their bare names, each
# would be a second identity of clipsearch.* (other folders hold no package code).
FOLDERS = sorted({target.relative_to(ROOT).parts[0] for target in LINKS.values()} | {"src"})


def test_the_top_level_folders_are_not_importable_by_their_bare_names() -> None:
    assert {"server", "client", "export", "protos", "src"} <= set(FOLDERS)
    assert [name for name in FOLDERS if importlib.util.find_spec(name) is not None] == []
    assert all(Path(entry or ".").resolve() != ROOT for entry in sys.path)


def test_each_linked_folder_imports_as_its_clipsearch_name() -> None:
    assert {"server", "client", "export", "v1"} <= set(LINKS)
    assert LINKS["v1"] == ROOT / "protos" / "clipsearch" / "v1"
    for name, target in LINKS.items():
        module = importlib.import_module(f"clipsearch.{name}")
        assert module.__file__ is not None
        assert Path(module.__file__).resolve() == target / "__init__.py", name


def is_project_file(path: Path) -> bool:
    """A file of the repository's own code: a virtualenv inside the checkout (make setup-dev
    puts .venv there) holds third-party packages, whose aliases are not ours to judge."""
    return path.is_relative_to(ROOT) and not path.is_relative_to(Path(sys.prefix).resolve())


def test_no_module_of_the_repository_is_loaded_under_two_names() -> None:
    walked = [
        info.name
        for info in pkgutil.walk_packages(clipsearch.__path__, "clipsearch.")
        if not info.name.endswith("__main__")  # it would run the command line
    ]
    for name in walked:
        importlib.import_module(name)
    assert {
        "clipsearch.server.service",
        "clipsearch.client",
        "clipsearch.v1.clipsearch_pb2",
    } <= set(walked)

    names_by_file: defaultdict[Path, set[str]] = defaultdict(set)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        # Some modules carry a placeholder name as __file__ (torch.ops): real files only.
        if file and Path(file).is_absolute() and is_project_file(Path(file).resolve()):
            names_by_file[Path(file).resolve()].add(name)
    twice = {str(f.relative_to(ROOT)): sorted(n) for f, n in names_by_file.items() if len(n) > 1}
    assert twice == {}
    outside = sorted(
        name
        for names in names_by_file.values()
        for name in names
        if name.split(".")[0] not in {"clipsearch", "tests"} and not name.endswith("_fixtures")
    )
    # Only protos/generate.py (tests/test_packaging.py loads it as a script module) may live
    # outside the package and the test modules.
    assert set(outside) <= {"generate"}, outside


def test_python_dash_m_pytest_from_the_root_keeps_the_bare_names_out() -> None:
    # `python -m` puts the working directory on sys.path: there, the bare names do import...
    subprocess.run(
        [sys.executable, "-c", "import server, export"], cwd=ROOT, check=True, timeout=60
    )
    # ...and tests/conftest.py takes the root off again before any test module is imported.
    node = f"{Path(__file__).relative_to(ROOT)}::" + (
        test_the_top_level_folders_are_not_importable_by_their_bare_names.__name__
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
