"""Attack: a curious coordinator learns whether one record is in a DP site's data from what the site
releases besides its noised encoder (threat-model row 3).

The coordinator picks everything in the plan: the seed (which fixed the pretext head's initial
weights and every augmentation), the batch size and the steps. It then compares the site's replies
on two neighbouring datasets, D and D-1 (one record removed), each run twice from a fresh state.
Under sample-level DP nothing released outside the noised weights may depend on the data: every
released scalar must be the same on D and D-1, and the weights (and every other draw of the site)
must not be reproducible from the plan, or the server could subtract the noise.

The site runs its real round (fedssl.site_round.run_site_round: deployment site.yaml, real digits
rows on disk, real Opacus, a signed ledger), as a deployed ClientApp calls it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedssl.fl import keys
from fedssl.fl.plan import TrainPlan
from fedssl.models import build_encoder
from site_layout import write_site_yaml

ROOT = Path(__file__).resolve().parents[2]
NUM_ROWS, BATCH_SIZE = 64, 8  # D and D-1 share q = 1/8: only the record itself differs
PLAN = TrainPlan(run_id="curious", server_round=1, planned_rounds=2, pretext="rotation", encoder="cnn", width=8, depth=2,
                 local_steps=2, batch_size=BATCH_SIZE, lr=0.05, seed=1234)


@pytest.fixture(scope="module")
def digits():
    """The first rows of the embedded digits, unlabelled, as a site holds them."""
    from fedssl.data.loaders import load_digits_labeled

    return load_digits_labeled()[0].subset(list(range(NUM_ROWS)))


@pytest.fixture(scope="module")
def rows(digits) -> np.ndarray:
    return digits.inputs.numpy().copy()


@pytest.fixture(scope="module")
def global_encoder(rows) -> dict[str, torch.Tensor]:
    return build_encoder("cnn", tuple(rows.shape[1:]), width=PLAN.width, depth=PLAN.depth, seed=0).state_dict()


@pytest.fixture(scope="module")
def approved_hash() -> str:
    from fedssl.deploy.site.pinning import app_hash

    return app_hash(ROOT)


def make_site(root: Path, data: np.ndarray, approved_hash: str) -> Path:
    """A deployed site as its operator lays it out: data on disk, own ledger key, own budget."""
    root.mkdir(parents=True)
    np.save(root / "data.npy", data)
    return write_site_yaml(root, target_epsilon=1.0, allowed_hashes=[approved_hash])


@pytest.fixture(scope="module")
def replies(tmp_path_factory, rows, global_encoder, approved_hash) -> dict[str, list]:
    """The site's replies to the same plan on D and on D-1 (record 0 removed), twice each."""
    from fedssl.site_round import run_site_round

    root = tmp_path_factory.mktemp("metric-leak")
    datasets = {"D": rows, "D-1": rows[1:]}
    out: dict[str, list] = {name: [] for name in datasets}
    for name, data in datasets.items():
        for run in range(2):
            site_yaml = make_site(root / f"{name}-{run}", data, approved_hash)
            reply = run_site_round({keys.NODE_SITE_CONFIG: str(site_yaml)}, {}, PLAN.to_wire(), global_encoder)
            assert reply.result.status == keys.STATUS_TRAINED, reply.result.reason
            out[name].append(reply.records)
    return out


def test_no_released_scalar_tells_d_from_d_minus_one(replies):
    """The attacker reads every non-array value the site released and looks for one that moves with the record."""
    released = {name: [dict(records[keys.METRICS]) for records in runs] for name, runs in replies.items()}
    names = sorted(set().union(*(m for runs in released.values() for m in runs)))
    telling = {
        name: {dataset: [m.get(name) for m in runs] for dataset, runs in released.items()}
        for name in names
        if len({repr(m.get(name)) for runs in released.values() for m in runs}) > 1
    }
    assert not telling, f"released values that differ between D and D-1 (or run to run) without noise: {telling}"


def test_the_server_cannot_reproduce_the_noised_weights(replies):
    """Same plan, same seed, same D: if the noise were seeded by the plan the two updates would be equal,
    and the server could regenerate the noise and subtract it."""
    first, second = (records[keys.ARRAYS].to_torch_state_dict() for records in replies["D"])
    assert any(not torch.equal(first[k], second[k]) for k in first)


class _RngAtForward(torch.nn.Module):
    """Notes the global RNG state each time the site's model runs: the draws its augmentations will use."""

    def __init__(self, model: torch.nn.Module, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_rng_state())
        return self.model(x)


class _Observe:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return _RngAtForward(model, self.seen)


def test_the_server_cannot_predict_the_sites_augmentations(tmp_path, digits, global_encoder):
    """Augmentations (here: which rotation each batch position gets) are drawn per batch position. A server
    that knew them would know how removing one record shifts every later record's augmentation, so one
    record's influence on the update would no longer be one clipped gradient. The attacker replays what
    the plan fixes: the seed, then building the model; the site's draws must not follow from it."""
    from fedssl.config import PrivacyConfig
    from fedssl.training.local import SiteSettings, build_pretext_model, train_round

    torch.manual_seed(PLAN.round_seed(0))
    build_pretext_model(PLAN, digits.input_shape, global_encoder)
    predicted = torch.get_rng_state()

    site = SiteSettings(site_id=0, state_dir=tmp_path / "state", privacy=PrivacyConfig(enabled=True, target_epsilon=1.0, delta=1e-5),
                        device="cpu")
    observe = _Observe()
    result = train_round(digits, global_encoder, PLAN, site, canaries=observe)
    assert result.status == keys.STATUS_TRAINED and observe.seen
    assert not torch.equal(observe.seen[0], predicted), "the site's augmentation draws are the ones the plan's seed predicts"
