"""Fail when an installed package's version differs from constraints.txt (the tested set)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def main(path: str) -> int:
    """Compare each pin with what is installed; print the drift; exit status."""
    drift = []
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, pinned = line.split("==")
        try:
            installed = version(name)
        except PackageNotFoundError:
            drift.append(f"{name}: pinned {pinned}, not installed")
            continue
        if installed != pinned:
            drift.append(f"{name}: pinned {pinned}, installed {installed}")
    if drift:
        print("installed versions differ from the tested set in " + path + ":\n  " + "\n  ".join(drift)
              + "\nregenerate it with .ci/freeze if the change is intended", file=sys.stderr)
        return 1
    print(f"{path}: every pinned version installed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt"))
