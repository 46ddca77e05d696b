"""The order pytest hands modules out in (tests/conftest.py calls it): real-process modules first, longest first."""

from __future__ import annotations

import json
from pathlib import Path

# Seconds each module with real-process tests took (setup, calls and teardown; 2026-12-07 runs on the 2-core CI
# machine, three workers): the order slow modules are handed out in. A module not listed counts as
# SLOW_MODULE_DEFAULT_SECONDS. A stale figure only costs balance, never a test: refresh it from
# `pytest -m slow --durations=0` when a module's cost changes much.
SLOW_MODULE_SECONDS = Path(__file__).with_name("slow_module_seconds.json")
SLOW_MODULE_DEFAULT_SECONDS = 60


def order_slow_modules_first(items: list) -> None:
    """Modules with real-process (slow) tests run first, longest first, each module's tests kept together and
    in order.

    With pytest-xdist's --dist loadfile a module is the unit of work, and a worker takes the next one as it
    frees up. A two-minute module handed out last is the run's tail, with the other workers idle (measured:
    ~3 of 10.5 minutes); longest-first leaves only short modules for the end. xdist keeps this order only with
    --no-loadscope-reorder (as `make test` runs it); by default it reorders files by their number of tests,
    which puts these one-test files last.
    """
    seconds = json.loads(SLOW_MODULE_SECONDS.read_text())
    root = Path(__file__).resolve().parents[1]
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    first_seen, cost = {}, {}
    for index, item in enumerate(items):
        name = item.module.__name__
        first_seen.setdefault(name, index)
        if name in slow_modules and name not in cost:
            cost[name] = seconds.get(Path(item.module.__file__).resolve().relative_to(root).as_posix(), SLOW_MODULE_DEFAULT_SECONDS)
    items.sort(key=lambda item: (item.module.__name__ not in slow_modules, -cost.get(item.module.__name__, 0),
                                 first_seen[item.module.__name__]))
