"""The layout rules: no command module imports another; the library imports neither Ray nor jobs."""

from __future__ import annotations

import ast
from pathlib import Path

from jobs.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports included), as absolute names."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(module)
            # `from . import x` and `from jobs import x` may name modules too.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_no_command_module_imports_another():
    commands = {module for module, _ in COMMANDS.values()}
    offenders = {}
    for module in commands:
        path = REPO / (module.replace(".", "/") + ".py")
        others = sorted(name for name in _imports(path) & commands if name != module)
        if others:
            offenders[module] = others
    assert not offenders, f"command modules import commands (move what they share below them): {offenders}"


def test_the_library_imports_neither_ray_nor_jobs():
    for path in (REPO / "mtcnn").rglob("*.py"):
        bad = sorted(name for name in _imports(path) if name.split(".")[0] in ("ray", "jobs"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
