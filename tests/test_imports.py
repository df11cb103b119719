"""The import graph runs one way: ``orchestrator/`` uses ``workers/``, never the reverse, and the ADD
core (``workers/add``) uses no worker package above it (only ``workers/data``'s storage). Read from
the source (ast), nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = sorted((ROOT / "workers").rglob("*.py"))


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth (functions' lazy imports included);
    relative imports resolved against the file's package under ``root``."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return sorted(found)


def _upward(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    """Where ``path`` imports one of the ``forbidden`` packages (or a module inside one)."""
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for line, module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_workers_are_found():
    assert len(WORKERS) > 50 and ROOT / "workers" / "train" / "loop.py" in WORKERS


@pytest.mark.parametrize("path", WORKERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_worker_module_imports_the_orchestrator(path):
    assert _upward(path, ("orchestrator",)) == []


@pytest.mark.parametrize(
    "path", sorted((ROOT / "workers" / "add").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_add_core_imports_no_worker_package_above_it(path):
    others = ("workers.train", "workers.diffusion", "workers.benchmark", "workers.eval")
    assert _upward(path, others) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """A new upward import, top-level or lazy, absolute or relative, is caught."""
    module = tmp_path / "workers" / "train" / "new.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "import os\n"
        "def f():\n"
        "    from orchestrator.spec import JobSpec\n"
        "    import orchestrator.tracking\n"
        "from ..add import step\n"
        "from . import loop\n"
    )
    found = [m for _, m in imported_modules(module, tmp_path)]
    assert found == ["os", "orchestrator.spec", "orchestrator.tracking", "workers.add", "workers.train"]
