"""The layout rules: the floors of jobs/ import only downwards; no command imports another; the
library imports neither Ray nor jobs."""

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


#: The floors of jobs/, top first: a module may import from its own floor and the floors below it
#: (commands never from each other; `submit` reads the dispatcher's parser to check what it sends).
#: training/ is a floor of its own: the training jobs.
FLOORS = ["commands", "pipelines", "training", "inputs", "output", "runtime", "common"]


def test_every_jobs_module_lives_on_a_floor_and_imports_only_downwards():
    offenders = {}
    loose = sorted(path.name for path in (REPO / "jobs").glob("*.py") if path.name not in ("__init__.py", "cli.py"))
    assert not loose, f"modules outside the floors of jobs/: {loose}"
    for floor in FLOORS:
        allowed = set(FLOORS[FLOORS.index(floor):]) | ({"cli"} if floor == "commands" else set())
        for path in (REPO / "jobs" / floor).rglob("*.py"):
            upward = sorted(name for name in _imports(path)
                            if name.startswith("jobs.") and name.split(".")[1] not in allowed)
            if upward:
                offenders[str(path.relative_to(REPO))] = upward
    assert not offenders, f"modules importing from a floor above theirs: {offenders}"


def test_annotate_and_crops_share_one_commit_one_scan_and_one_settings_check():
    # The OUTPUT protocol has one home: neither job holds a lease, a retry loop or a scan of its own.
    for job in ("annotate", "crops"):
        text = (REPO / "jobs" / "pipelines" / f"{job}.py").read_text()
        for own in ("Lease(", "for attempt in", "redo_mask(", "commit_file(", "other settings"):
            assert own not in text or (own == "commit_file(" and job == "annotate" and "def commit_rows" in text), \
                f"pipelines/{job}.py has its own {own}"
