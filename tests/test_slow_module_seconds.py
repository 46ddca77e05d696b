"""tests/slow_module_seconds.json orders the real-process modules (tests/conftest.py): every module it names
must exist and hold slow tests, so a renamed or split module does not silently fall back to the default cost."""

from __future__ import annotations

import json

from slow_order import SLOW_MODULE_SECONDS


def test_every_module_the_slow_order_names_exists_and_has_slow_tests():
    root = SLOW_MODULE_SECONDS.parents[1]
    seconds = json.loads(SLOW_MODULE_SECONDS.read_text())
    assert seconds and all(isinstance(s, (int, float)) and s > 0 for s in seconds.values()), seconds
    stale = [name for name in seconds if not (root / name).is_file() or "mark.slow" not in (root / name).read_text()]
    assert not stale, f"tests/slow_module_seconds.json names modules that are gone or have no slow tests: {stale}"
