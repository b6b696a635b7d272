"""The import rules of docs/ARCHITECTURE.md, checked on the source (so a change that breaks
one fails here, not in review)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", modules("lm"), ids=_rel)
def test_the_library_imports_no_http_code(path: Path):
    if _rel(path) == "lm/commands/serve.py":  # hands its flags to service.app.run
        return
    bad = {
        m
        for m in imports(path)
        if m.split(".")[0] in ("service", "fastapi", "uvicorn", "starlette")
    }
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("lm") + modules("service"), ids=_rel)
def test_only_training_code_imports_the_trainer(path: Path):
    if _rel(path) in ("lm/train.py", "lm/commands/train.py"):
        return
    assert "lm.train" not in imports(path), f"{_rel(path)} imports lm.train"


@pytest.mark.parametrize("path", modules("lm") + modules("service"), ids=_rel)
def test_the_library_never_imports_commands(path: Path):
    if _rel(path).startswith(("lm/commands/", "lm/cli.py", "lm/__main__.py")):
        return
    bad = {m for m in imports(path) if m.startswith(("lm.commands", "lm.cli"))}
    assert not bad, f"{_rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("lm") + modules("service"), ids=_rel)
def test_matplotlib_only_through_plotting(path: Path):
    if _rel(path) == "lm/plotting.py":
        return
    assert not {m for m in imports(path) if m.startswith("matplotlib")}, _rel(path)


def test_the_engine_names_no_model_kind_and_no_http():
    engine = imports(ROOT / "lm/engine.py")
    assert not {m for m in engine if m.startswith(("lm.models", "service", "fastapi"))}
