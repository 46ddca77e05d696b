"""Start-up cost cuts of the simulation path (benchmarks/README.md, section 2) change nothing else.

- the staged app gives `flwr run` byte-for-byte the FAB the checkout gives;
- the apps import without the training stack (it loads on a site's first message).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.run.flower_runtime import PROJECT_ROOT
from fedssl.run.app_stage import stage_app


def _fab(path: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(path)


def test_staged_app_builds_the_same_fab_without_walking_ignored_trees(tmp_path):
    project = tmp_path / "project"
    files = {
        "pyproject.toml": (PROJECT_ROOT / "pyproject.toml").read_text(),
        ".gitignore": ".venv/\nruns/\n*.pyc\n",
        "fedssl/__init__.py": "",
        "fedssl/a.py": "A = 1\n",
        "clients/client_app.py": "app = None\n",
        "server/server_app.py": "app = None\n",
        "configs/x.yaml": "a: 1\n",
        "docs/notes.md": "# notes\n",
        "docs/figure.png": "not in a FAB\n",
        ".venv/lib/site.py": "never\n",
        "runs/old/config.yaml": "never: 1\n",
        "fedssl/__pycache__/a.cpython-311.pyc": "never",
        ".git/config": "[core]\n",
    }
    for rel, text in files.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    (project / "fedssl" / "linked.py").symlink_to(project / "fedssl" / "a.py")

    staged = stage_app(project, tmp_path / "stage")
    assert _fab(staged) == _fab(project)
    assert not (staged / ".venv").exists() and not (staged / "runs").exists() and not (staged / ".git").exists()
    assert (staged / "fedssl" / "a.py").read_text() == "A = 1\n" and not (staged / "fedssl" / "linked.py").exists()
    # staging again replaces the old copy (a file deleted from the project disappears)
    (project / "docs" / "notes.md").unlink()
    assert not (stage_app(project, tmp_path / "stage") / "docs" / "notes.md").exists()


@pytest.mark.slow
def test_staged_checkout_builds_the_checkouts_fab(tmp_path):
    assert _fab(stage_app(PROJECT_ROOT, tmp_path / "stage")) == _fab(PROJECT_ROOT)


def test_apps_import_without_the_training_stack():
    """The Simulation Engine imports the ClientApp before starting Ray: it must not pull in Opacus/torch."""
    code = (
        "import sys, clients.client_app, server.server_app\n"
        "heavy = sorted(m for m in ('opacus', 'sklearn', 'scipy', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""
    code = "import sys, clients.client_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
