"""The Flower app a `flwr run` or an app hash sees, staged without the checkout's ignored trees.

Flower's FAB builder (``flwr.cli.build``) walks every file under the app directory and filters
afterwards: in a checkout with .venv/ and runs/ that is ~45k files, 5-8 s on 2 cores, paid by every
`flwr run` and every app hash. :func:`stage_app` copies only what can be in the FAB, so Flower's own
rules, applied to the copy, build the same bundle (tests/run/test_startup.py pins that) in a blink.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Never part of a FAB: Flower's own exclusions (.venv, .flwr, __pycache__) and git's internals.
NEVER_IN_FAB = frozenset({".venv", ".flwr", "__pycache__", ".git"})
# Where a launcher stages the app: under a simulation's private FLWR_HOME, or the coordinator's state dir.
APP_STAGE_DIR = "app-source"


def stage_app(project: Path, dest: Path) -> Path:
    """Copy the Flower app at ``project`` to ``dest``, minus what can never be in its FAB.

    Skipped: directories git ignores (.gitignore at the top, e.g. .venv/ and runs/) and
    :data:`NEVER_IN_FAB`. Everything else is copied as is and `flwr run` applies all of its own
    rules to the copy, so the FAB (and its hash) is the one `flwr run <project>` builds; only the
    walk over the ignored trees is saved. Without a readable .gitignore, only NEVER_IN_FAB is skipped.
    """
    project = project.resolve()
    ignored = _gitignore_matcher(project / ".gitignore")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(project, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(project)
        dirnames[:] = [
            d for d in dirnames
            if d not in NEVER_IN_FAB and not (here / d).is_symlink() and not ignored((rel_dir / d).as_posix() + "/")
        ]
        for name in filenames:
            source = here / name
            rel = (rel_dir / name).as_posix()
            if source.is_symlink() or ignored(rel):  # `flwr run` skips symlinks too
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return dest


def _gitignore_matcher(path: Path):
    try:
        import warnings

        import pathspec  # a dependency of flwr; the same matcher (and pattern style) its FAB builder uses

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            spec = pathspec.PathSpec.from_lines("gitwildmatch", path.read_text().splitlines())
    except (ImportError, OSError, ValueError):
        return lambda rel: False
    return spec.match_file


def build_app_bundle(project: Path) -> bytes:
    """The FAB bytes `flwr run <project>` would ship, built by Flower from a staged copy."""
    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="fedssl-app-") as scratch:
        return build_fab_from_disk(stage_app(project, Path(scratch) / "app"))
