"""Site-level (central) DP: the accountant over rounds and sampling, Flower's clipping mods and
wrappers as wired here, and (slow) a real SecAgg+ federation with client-side clipping."""

from __future__ import annotations

import json
import math
import time
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fedssl.config import load_config
from fedssl.errors import BudgetExhaustedError, ConfigError, PrivacyError
from fedssl.fl import keys
from fedssl.layout import SITE_LEVEL_STATE as STATE_FILE
from fedssl.layout import RunDir
from fedssl.privacy.site_level import (
    FIELD_EPSILON,
    SiteLevelAccountant,
    SiteLevelMechanism,
    epsilon_after,
    noise_for_target,
    privacy_facts_from_reports,
)
from fedssl.privacy.statement import privacy_statement

TINY = "configs/experiments/digits-tiny.yaml"
DELTA = 1e-5


# ----------------------------------------------------------------- the accountant

def _flower_epsilon(sigma: float, sampled: int, population: int, rounds: int, without_replacement: bool) -> float:
    """Flower's own client-level RDP accountant (flwr.supercore.privacy_accounting), as a cross-check."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    method, relation = (
        (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE)
        if without_replacement
        else (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE)
    )
    accountant = RdpAccountant(PrivacyConfig(DELTA, population, relation, method))
    accountant.compose(GaussianPrivacyEvent(sigma, sampled, population), rounds)
    return accountant.get_epsilon(DELTA)


def test_epsilon_without_sampling_matches_flowers_accountant() -> None:
    mech = SiteLevelMechanism(1.2, 1.0, 5, 5, DELTA)
    assert epsilon_after(mech, 10) == pytest.approx(_flower_epsilon(1.2, 5, 5, 10, without_replacement=False), rel=1e-9)
    assert epsilon_after(mech, 0) == 0.0
    assert epsilon_after(mech, 1) < epsilon_after(mech, 2) < epsilon_after(mech, 10)


def test_sampling_without_replacement_counts_replace_one_sensitivity() -> None:
    """Replacing a site moves the clipped sum by 2C: the multiplier is σ/2 (Flower's event takes σ as given)."""
    mech = SiteLevelMechanism(3.0, 1.0, 10, 40, DELTA)
    ours = epsilon_after(mech, 20)
    assert ours == pytest.approx(_flower_epsilon(1.5, 10, 40, 20, without_replacement=True), rel=1e-9)
    assert ours > _flower_epsilon(3.0, 10, 40, 20, without_replacement=True)
    # Sampling 10 of 40 costs less than every site every round at the same effective noise.
    assert ours < epsilon_after(SiteLevelMechanism(1.5, 1.0, 40, 40, DELTA), 20)


def test_noise_is_calibrated_to_the_target_over_the_planned_rounds() -> None:
    sigma = noise_for_target(4.0, DELTA, rounds=10, sample_size=5, population=5)
    assert epsilon_after(SiteLevelMechanism(sigma, 1.0, 5, 5, DELTA), 10) <= 4.0
    assert epsilon_after(SiteLevelMechanism(sigma / 1.01, 1.0, 5, 5, DELTA), 10) > 4.0


def test_accountant_charges_before_release_persists_and_refuses(tmp_path) -> None:
    mech = SiteLevelMechanism(2.0, 1.0, 5, 5, DELTA)
    cap = epsilon_after(mech, 3)
    accountant = SiteLevelAccountant(mech, target_epsilon=cap, path=tmp_path / STATE_FILE)
    for server_round in (1, 2, 3):
        assert accountant.charge(server_round) == pytest.approx(epsilon_after(mech, server_round))
    with pytest.raises(BudgetExhaustedError, match="site_dp.target_epsilon"):
        accountant.charge(4)
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["rounds"] == [1, 2, 3] and saved["epsilon"] == pytest.approx(cap)
    reopened = SiteLevelAccountant(mech, target_epsilon=cap, path=tmp_path / STATE_FILE)
    assert reopened.epsilon == pytest.approx(cap)
    with pytest.raises(PrivacyError, match="start a new run directory"):
        SiteLevelAccountant(SiteLevelMechanism(1.0, 1.0, 5, 5, DELTA), path=tmp_path / STATE_FILE)


def test_statement_composes_what_the_server_ledger_records() -> None:
    mech = SiteLevelMechanism(2.0, 0.5, 3, 3, DELTA, "client")
    accountant = SiteLevelAccountant(mech)
    accountant.charge(1)
    body = {"round": 1, "aggregation": "secaggplus", **accountant.ledger_fields()}
    secure, site_level = privacy_facts_from_reports([body, {**body, "site_id": 1}])
    assert secure is True and site_level["epsilon"] == pytest.approx(accountant.epsilon)
    assert privacy_facts_from_reports([body, {"round": 1, "aggregation": "fedavg"}])[0] is False
    assert privacy_facts_from_reports([]) == (None, None)
    assert privacy_facts_from_reports([{"round": 1, "aggregation": "fedavg"}]) == (False, None)
    text = privacy_statement(
        sample_level=[{"site_id": "site-000", "epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}],
        site_level=site_level,
        secure_aggregation=secure,
    )
    assert f"site-level guarantee of ε = {accountant.epsilon:.3f}" in text
    assert "clipped to L2 norm 0.5 (client-side)" in text and "trusted to add that noise" in text
    assert "SecAgg+" in text and "in the clear" in text and "ε = 3.000" in text


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["site_dp.enabled=true"], "site_dp.noise_multiplier"),
        (["site_dp.enabled=true", "site_dp.noise_multiplier=0"], "site_dp.noise_multiplier"),
        (["site_dp.enabled=true", "site_dp.noise_multiplier=1", "site_dp.clipping_norm=-1"], "site_dp.clipping_norm"),
        (["site_dp.enabled=true", "site_dp.noise_multiplier=1", "site_dp.side=both"], "site_dp.side"),
        (["site_dp.enabled=true", "site_dp.noise_multiplier=1", "site_dp.delta=1"], "site_dp.delta"),
        (["site_dp.enabled=true", "site_dp.noise_multiplier=1", "site_dp.side=server", "secure_aggregation.enabled=true",
          "secure_aggregation.num_shares=1.0"], "site_dp.side"),
    ],
)
def test_bad_site_dp_config_is_one_line_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value)


def test_sitedp_config_loads() -> None:
    config = load_config("configs/experiments/digits-sitedp.yaml")
    assert config.site_dp.enabled and config.site_dp.side == "server" and config.site_dp.target_epsilon == 8


# ----------------------------------------------------------------- server side: fixed-denominator mean, wrappers

def test_fixed_denominator_mean_counts_missing_sites_as_zero_updates() -> None:
    from server.site_dp import fixed_denominator_mean, summed_updates

    current = [np.zeros(2, np.float32), np.ones(1, np.float32)]
    updates = [[np.array([3.0, 0.0], np.float32), np.array([2.0], np.float32)]]
    mean = fixed_denominator_mean(current, summed_updates(current, updates), sites_per_round=3)  # 2 of 3 sampled sites refused or dropped
    assert np.allclose(mean[0], [1.0, 0.0]) and np.allclose(mean[1], [1 + 1 / 3]) and mean[0].dtype == np.float32


def test_message_strategy_uses_flowers_wrappers(tmp_path) -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping

    from fedssl.privacy.ledger import ServerLedger
    from fedssl.runlog import RunLog
    from server.site_dp import SiteDPAvg, SiteLevelBook, message_strategy
    from server.strategy import FedSSLAvg, RoundRecorder

    def build(*overrides):
        config = load_config(TINY, ["federation.num_sites=4", *overrides])
        book = SiteLevelBook(config, tmp_path) if config.site_dp.enabled else None
        recorder = RoundRecorder(run_log=RunLog(tmp_path), server_ledger=ServerLedger(RunDir(tmp_path).server_ledger), num_rounds=2)
        return message_strategy(config, book, recorder=recorder)

    assert type(build()) is FedSSLAvg
    server = build("site_dp.enabled=true", "site_dp.noise_multiplier=1.5", "site_dp.side=server", "site_dp.clipping_norm=0.3")
    assert isinstance(server, DifferentialPrivacyServerSideFixedClipping) and isinstance(server.strategy, SiteDPAvg)
    assert (server.noise_multiplier, server.clipping_norm, server.num_sampled_clients) == (1.5, 0.3, 4)
    client = build("site_dp.enabled=true", "site_dp.noise_multiplier=1.5")
    assert isinstance(client, DifferentialPrivacyClientSideFixedClipping)


# ----------------------------------------------------------------- site side: the clipping mods

def _instruction(content: RecordDict, message_type: str = "train") -> Message:
    return Message(content=content, metadata=Metadata(
        run_id=7, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=4242, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type))


def _context() -> Context:
    return Context(run_id=7, node_id=4242, node_config={}, state=RecordDict(), run_config={})


def _norm(arrays: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def test_message_api_clipping_mod_clips_only_when_asked_and_passes_refusals() -> None:
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from clients.site_dp_mods import site_update_clipping_mod

    start = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    trained = {"w": np.full(4, 3.0, np.float32), "b": np.full(2, 4.0, np.float32)}

    def message(config):
        return _instruction(RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in start.items()}), keys.CONFIG: ConfigRecord(config)}))

    def site(arrays):
        def call(msg, ctxt):
            records = {keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10})}
            if arrays is not None:
                records[keys.ARRAYS] = ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()})
            return Message(content=RecordDict(records), reply_to=msg)
        return call

    clipped = site_update_clipping_mod(message({KEY_CLIPPING_NORM: 1.0}), _context(), site(trained))
    out = clipped.content[keys.ARRAYS]
    assert _norm([out[k].numpy() - start[k] for k in start]) == pytest.approx(1.0, rel=1e-5)
    untouched = site_update_clipping_mod(message({}), _context(), site(trained)).content[keys.ARRAYS]
    assert np.array_equal(untouched["w"].numpy(), trained["w"])
    refused = site_update_clipping_mod(message({KEY_CLIPPING_NORM: 1.0}), _context(), site(None))
    assert not refused.has_error() and keys.ARRAYS not in refused.content


def test_legacy_clipping_mod_clips_inside_secagg_and_passes_refusals() -> None:
    from flwr.common import FitRes, Status, Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from clients.site_dp_mods import legacy_site_update_clipping_mod

    start = [np.zeros(4, np.float32), np.zeros(2, np.float32)]
    trained = [np.full(4, 3.0, np.float32), np.full(2, 4.0, np.float32)]

    def message(config):
        return _instruction(compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(start), config), True))

    def site(arrays, weight):
        def call(msg, ctxt):
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {})
            return Message(content=compat.fitres_to_recorddict(res, True), reply_to=msg)
        return call

    def params(reply):
        return parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, True).parameters)

    clipped = legacy_site_update_clipping_mod(message({KEY_CLIPPING_NORM: 0.5}), _context(), site(trained, 1))
    assert _norm(params(clipped)) == pytest.approx(0.5, rel=1e-5)
    plain = legacy_site_update_clipping_mod(message({}), _context(), site(trained, 1))
    assert _norm(params(plain)) == pytest.approx(_norm(trained))
    refused = legacy_site_update_clipping_mod(message({KEY_CLIPPING_NORM: 0.5}), _context(), site(start, 0))
    assert not refused.has_error() and _norm(params(refused)) == 0.0  # Flower's mod would divide by a zero norm


# ----------------------------------------------------------------- slow: SecAgg+ with client-side site-level DP

SIGMA, CLIP, SITES, ROUNDS = 0.05, 0.05, 3, 2


@pytest.fixture(scope="module")
def sitedp_run(tmp_path_factory):
    from flower_tap import Tap, run_tapped

    monkeypatch = pytest.MonkeyPatch()
    try:
        config = load_config(TINY, [
            f"federation.num_sites={SITES}", f"federation.rounds={ROUNDS}", "run.name=sitedp",
            "secure_aggregation.enabled=true", "secure_aggregation.num_shares=3", "secure_aggregation.reconstruction_threshold=2",
            "site_dp.enabled=true", "site_dp.side=client", f"site_dp.noise_multiplier={SIGMA}", f"site_dp.clipping_norm={CLIP}",
        ])
        run_dir, tap_dir = run_tapped(config, tmp_path_factory.mktemp("sitedp"), monkeypatch)
    finally:
        monkeypatch.undo()
    return config, run_dir, Tap.load(tap_dir)


def _clip(update: dict[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    scale = min(1.0, norm / _norm(list(update.values())))
    return {k: v * scale for k, v in update.items()}


@pytest.mark.slow
def test_secagg_with_client_side_clipping_and_server_noise(sitedp_run) -> None:
    config, run_dir, tap = sitedp_run
    final = {k: v.numpy().astype(np.float64) for k, v in torch.load(run_dir / "encoder.pt").items()}
    noise_std = SIGMA * CLIP / SITES  # what Flower's wrapper adds to the mean
    for server_round in range(1, ROUNDS + 1):
        sites = [tap.sites[(server_round, s)] for s in range(SITES)]
        start = {k: v.astype(np.float64) for k, v in sites[0]["global"].items()}
        updates = [{k: s["trained"][k].astype(np.float64) - start[k] for k in start} for s in sites]
        clipped_mean = {k: start[k] + sum(_clip(u, CLIP)[k] for u in updates) / SITES for k in start}
        unclipped_mean = {k: start[k] + sum(u[k] for u in updates) / SITES for k in start}
        released = final if server_round == ROUNDS else {k: v.astype(np.float64) for k, v in tap.sites[(server_round + 1, 0)]["global"].items()}
        residual = np.concatenate([(released[k] - clipped_mean[k]).ravel() for k in start])
        off = np.concatenate([(released[k] - unclipped_mean[k]).ravel() for k in start])
        # What is left after the clipped mean is Gaussian noise of the calibrated size, nothing else.
        assert np.std(residual) == pytest.approx(noise_std, rel=0.25)
        assert abs(np.mean(residual)) < 4 * noise_std / math.sqrt(residual.size)
        assert np.sqrt(np.mean(off**2)) > 2 * noise_std  # the sites really clipped before masking
        assert all(_norm(list(u.values())) > 2 * CLIP for u in updates)  # (so clipping mattered)


@pytest.mark.slow
def test_site_level_epsilon_is_charged_recorded_and_stated(sitedp_run) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from fedssl.audit.ledgers import audit_path
    from fedssl.privacy.ledger import ServerLedger

    config, run_dir, tap = sitedp_run
    mech = SiteLevelMechanism(SIGMA, CLIP, SITES, SITES, config.site_dp.delta, "client")
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert state["rounds"] == [1, 2] and state["epsilon"] == pytest.approx(epsilon_after(mech, 2))
    reports = ServerLedger(RunDir(run_dir).server_ledger).round_reports()
    assert len(reports) == SITES * ROUNDS and all(r["aggregation"] == "secaggplus" for r in reports)
    assert sorted({(r["round"], round(r[FIELD_EPSILON], 9)) for r in reports}) == [
        (1, round(epsilon_after(mech, 1), 9)), (2, round(epsilon_after(mech, 2), 9))]
    # Uniform weights under site-level DP: every contributing site's weight in the clear is 1.
    for exchange in tap.stage_exchanges(Stage.COLLECT_MASKED_VECTORS):
        assert [r["metrics"]["fitres.num_examples"]["num_examples"] for r in exchange["received"]] == [1] * SITES
    report = audit_path(run_dir)
    assert report.ok
    assert f"site-level guarantee of ε = {epsilon_after(mech, 2):.3f}" in report.statement
    assert "SecAgg+" in report.statement
