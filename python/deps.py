"""The dependency sets hybridgen is tested with (used by python/bootstrap.sh).

    python python/deps.py lowest EXTRAS   constraints pinning every direct dependency of hybridgen
                                          (and of EXTRAS) to its declared lower bound
    python python/deps.py lock            python/constraints.txt from the running environment
                                          (run by python/lock.sh after a fresh newest install)

"locked" installs python/constraints.txt (exact versions last verified); "newest" installs what
the registries serve within pyproject's ranges; "lowest" installs each direct dependency at its
lower bound (transitive ones as the resolver picks). CI runs the test suite in all three.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "python" / "constraints.txt"


def direct_requirements(extras: list[str]) -> list[str]:
    """Requirement strings of hybridgen and of ``extras`` (self-references followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    reqs, seen, todo = list(project["dependencies"]), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"deps.py: no extra {extra!r} in pyproject.toml (known: {', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            inner = re.fullmatch(r"hybridgen\[([\w,\s-]+)\]", req.replace(" ", ""))
            if inner:
                todo.extend(inner.group(1).split(","))
            else:
                reqs.append(req)
    return reqs


def lowest(extras: list[str]) -> str:
    """``name==lower`` for every direct requirement with a lower bound (``>=`` or ``==``)."""
    pins = {}
    for req in direct_requirements(extras):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", req.split(";")[0].strip())
        name, spec = m.group(1).lower().replace("_", "-"), m.group(2)
        bound = re.search(r"(?:>=|==)\s*([^,\s]+)", spec)
        if not bound:
            raise SystemExit(f"deps.py: {req!r} has no lower bound; every dependency needs one that CI verifies")
        pins[name] = bound.group(1)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def lock() -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude", "hybridgen", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = sorted(line for line in frozen.splitlines() if line and not line.startswith(("-e ", "#")))
    import platform

    header = (
        "# Exact versions the test suite last passed with (python/lock.sh regenerates this file from a\n"
        f"# fresh install of the newest allowed versions; Python {platform.python_version()}, {platform.machine()}).\n"
    )
    CONSTRAINTS.write_text(header + "\n".join(lines) + "\n")
    print(f"deps.py: wrote {CONSTRAINTS.relative_to(ROOT)} ({len(lines)} packages)")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "lowest":
        sys.stdout.write(lowest([e for e in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if e]))
    elif sys.argv[1:] == ["lock"]:
        lock()
    else:
        raise SystemExit(__doc__)
