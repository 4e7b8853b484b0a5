"""The README is a newcomer's page: short, with the two commands, linking the documents that
hold the rest (and those documents exist and stay readable)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "benchmarks/README.md", "kernels/README.md", "tests/README.md", "python/README.md"]


def test_readme_is_short_and_gives_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "bash python/bootstrap.sh hf && .venv/bin/python -m hybridgen generate" in text
    assert "bash tests/run.sh" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in ci, "CI runs the README's test command"


def test_every_relative_link_of_the_docs_resolves():
    missing = []
    for doc in DOCS:
        path = ROOT / doc
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not (path.parent / target).exists():
                missing.append(f"{doc}: {target}")
    assert not missing, missing


def test_docs_have_no_line_too_wide_to_read():
    wide = [
        f"{doc}:{i}"
        for doc in DOCS
        for i, line in enumerate((ROOT / doc).read_text().splitlines(), 1)
        if len(line) > 200
    ]
    assert not wide, wide
