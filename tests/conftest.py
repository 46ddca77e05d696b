"""Shared fixtures: tiny real data, a tiny plan, and one real DP site trained through a whole plan.

Everything here is real (digits rows, Opacus, files on disk); only the sizes are small.
The numbers below are chosen so that noise calibration and RDP accounting stay fast:
64 rows with batch size 8 give a Poisson sample rate q = 1/8, and 2 rounds x 2 local
steps = 4 planned steps at a budget of epsilon = 1.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from slow_order import order_slow_modules_first

# The dashboard's fixtures (a tiny run, the dashboard process, the browser): only the tests that ask build them.
pytest_plugins = ["dashboard_fixtures", "reference_run"]

WIDTH, DEPTH = 8, 2
NUM_SAMPLES, BATCH_SIZE = 64, 8
SAMPLE_RATE = 1 / 8  # 1 / ceil(NUM_SAMPLES / BATCH_SIZE), what Opacus derives from the loader
LOCAL_STEPS, PLANNED_ROUNDS = 2, 2
TARGET_EPSILON, DELTA = 1.0, 1e-5


@pytest.fixture(scope="session")
def digits_site():
    """The first 64 rows of the embedded digits, unlabelled, as a site holds them."""
    from fedssl.data.loaders import load_digits_labeled

    full, _ = load_digits_labeled()
    return full.subset(list(range(NUM_SAMPLES)))


@pytest.fixture(scope="session")
def global_encoder(digits_site):
    """The server's initial encoder weights for the tiny CNN."""
    from fedssl.models import build_encoder

    return build_encoder("cnn", digits_site.input_shape, width=WIDTH, depth=DEPTH, seed=0).state_dict()


@pytest.fixture(scope="session")
def make_plan() -> Callable[..., object]:
    """``make_plan(server_round=2, pretext="byol")``: the tiny TrainPlan with overrides."""
    from fedssl.fl.plan import TrainPlan

    def make(**overrides):
        values = dict(
            run_id="test-run",
            server_round=1,
            planned_rounds=PLANNED_ROUNDS,
            pretext="rotation",
            encoder="cnn",
            width=WIDTH,
            depth=DEPTH,
            local_steps=LOCAL_STEPS,
            batch_size=BATCH_SIZE,
            lr=0.05,
            seed=0,
        )
        values.update(overrides)
        return TrainPlan(**values)

    return make


@pytest.fixture(scope="session")
def make_site() -> Callable[..., object]:
    """``make_site(state_dir, enabled=True, target_epsilon=1.0)``: a site's own settings."""
    from fedssl.config import PrivacyConfig
    from fedssl.training.local import SiteSettings

    def make(state_dir: Path, *, enabled: bool = True, target_epsilon: float = TARGET_EPSILON, delta: float = DELTA, site_id: int = 0):
        return SiteSettings(
            site_id=site_id,
            state_dir=Path(state_dir),
            privacy=PrivacyConfig(enabled=enabled, target_epsilon=target_epsilon, delta=delta),
            device="cpu",
        )

    return make


@dataclass(frozen=True)
class TrainedSite:
    """Snapshots of one DP site's state dir after each round of a 2-round plan (do not modify)."""

    after_round1: Path
    after_round2: Path
    round1: object  # RoundResult
    round2: object  # RoundResult


@pytest.fixture(scope="session")
def trained_site(tmp_path_factory, digits_site, global_encoder, make_plan, make_site) -> TrainedSite:
    """A real DP site that ran its whole plan (2 rounds); state snapshots after each round."""
    from fedssl.training.local import train_round

    root = tmp_path_factory.mktemp("trained-site")
    live = root / "live"
    site = make_site(live)
    round1 = train_round(digits_site, global_encoder, make_plan(server_round=1), site)
    shutil.copytree(live, root / "after-round-1")
    round2 = train_round(digits_site, round1.encoder_state, make_plan(server_round=2), site)
    shutil.copytree(live, root / "after-round-2")
    return TrainedSite(root / "after-round-1", root / "after-round-2", round1, round2)


@pytest.fixture
def state_copy(tmp_path) -> Callable[[Path], Path]:
    """``state_copy(snapshot)``: a private, writable copy of a site state dir."""

    copies = itertools.count()

    def copy(source: Path) -> Path:
        target = tmp_path / f"state-{source.name}-{next(copies)}"
        shutil.copytree(source, target)
        return target

    return copy


def pytest_collection_modifyitems(config, items):
    order_slow_modules_first(items)
