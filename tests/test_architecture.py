"""The layout's rules (docs/architecture.md), checked by reading the source: who imports whom,
who opens database sessions, who reads the environment, and how large a module may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "indexer", "medsearch")
MAX_LINES = 420  # "about 400": a module past this has more than one job


def _modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py")
                  if "migrations" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every module name imported by a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(ROOT).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_retrieval_never_imports_indexer_or_the_application():
    offenders = {_rel(p): sorted(n for n in _imports(p) if n.split(".")[0] in ("indexer", "medsearch"))
                 for p in _modules("retrieval")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_indexer_never_imports_the_application():
    offenders = {_rel(p): sorted(n for n in _imports(p) if n.split(".")[0] == "medsearch")
                 for p in _modules("indexer")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_web_app_never_imports_the_cli():
    offenders = {_rel(p): sorted(n for n in _imports(p) if n.startswith("medsearch.cli"))
                 for p in _modules("medsearch/web")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_store_opens_database_sessions():
    session_apis = ("sqlalchemy.orm.Session", "sqlalchemy.orm.sessionmaker",
                    "sqlalchemy.create_engine", "sqlite3")
    outside = [p for p in _modules(*PACKAGES, "benchmarks")
               if "store" not in p.relative_to(ROOT).parts[:2]]
    offenders = {_rel(p): sorted(n for n in _imports(p) if n.startswith(session_apis))
                 for p in outside}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_settings_module_reads_the_environment():
    allowed = {"medsearch/settings.py", "retrieval/userdirs.py"}
    offenders = []
    for path in _modules(*PACKAGES):
        if _rel(path) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                offenders.append(f"{_rel(path)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("path", _modules(*PACKAGES), ids=_rel)
def test_modules_stay_small_and_say_their_job(path: Path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_LINES, f"{_rel(path)} has more than one job"
    if source.strip():
        assert ast.get_docstring(ast.parse(source)), f"{_rel(path)} lacks a docstring"
