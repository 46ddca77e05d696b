"""docs/threat-model.md names the test that pins each defence: every test it names must exist.

A renamed or moved test would otherwise leave the table pointing at nothing while still reading as
proof. References are `tests/x.py`, `tests/x.py::test_name`, or `::test_name` (same file as the
reference before it in the row).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "threat-model.md"
REFERENCE = re.compile(r"`((?:tests/[\w/]+\.py)?)(?:::(\w+))?`")


def references() -> list[tuple[str, str | None]]:
    found = []
    for line in DOC.read_text().splitlines():
        current = None
        for path, name in REFERENCE.findall(line):
            current = path or current
            if current and (path or name):
                found.append((current, name or None))
    return found


def test_every_test_the_threat_model_names_exists():
    refs = references()
    assert len(refs) >= 10, "the threat table should name a test per threat"
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.exists():
            missing.append(path)
            continue
        if name:
            defined = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
            if name not in defined:
                missing.append(f"{path}::{name}")
    assert not missing, f"docs/threat-model.md names tests that do not exist: {missing}"
