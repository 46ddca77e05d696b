"""Secure aggregation with Flower's SecAgg+: the server learns only the (weighted) sum.

The slow test runs the production apps under `flwr run` (3 sites, 3 rounds, DP-SGD at each
site) behind a recording Grid (tests/flower_tap.py) and checks what the server received:
round 1 all sites, round 2 one site crashes after training (a mid-round dropout, after the
key exchange), round 3 one site refuses (budget spent).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedssl.config import load_config
from fedssl.errors import ConfigError
from fedssl.fl import keys

TINY = "configs/experiments/digits-tiny.yaml"
SECAGG = ["secure_aggregation.enabled=true", "secure_aggregation.num_shares=3", "secure_aggregation.reconstruction_threshold=2"]
NUM_SITES, ROUNDS = 3, 3
DROP = {(2, 2)}  # (round, site): crashes after training, before sending its masked vector
REFUSE = {(3, 0)}  # (round, site): replies as a site whose budget is spent


# ----------------------------------------------------------------- fast: config and the refused-site reply

@pytest.mark.parametrize(
    "override, key",
    [
        ("secure_aggregation.num_shares=2", "secure_aggregation.num_shares"),
        ("secure_aggregation.num_shares=2.5", "secure_aggregation.num_shares"),
        ("secure_aggregation.reconstruction_threshold=3", "secure_aggregation.reconstruction_threshold"),
        ("secure_aggregation.reconstruction_threshold=0", "secure_aggregation.reconstruction_threshold"),
        ("secure_aggregation.modulus_range=3000000000", "secure_aggregation.modulus_range"),
        ("secure_aggregation.max_weight=0", "secure_aggregation.max_weight"),
        ("federation.num_sites=1", "secure_aggregation.enabled"),
        ("secure_aggregation.num_shares=5", "secure_aggregation.num_shares"),  # above the 3 sites per round
    ],
)
def test_bad_secure_aggregation_config_is_one_line_naming_the_key(override: str, key: str) -> None:
    overrides = ["federation.num_sites=3", "federation.min_sites=1", *SECAGG, override]
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    message = str(err.value)
    assert message.startswith(f"{key}:") and "\n" not in message


def test_secagg_configs_load() -> None:
    config = load_config("configs/experiments/digits-secagg.yaml")
    assert config.secure_aggregation.enabled and config.secure_aggregation.num_shares == 5
    assert not load_config("configs/experiments/digits-demo.yaml").secure_aggregation.enabled


def test_weight_policy() -> None:
    """The weight travels in the clear (FitRes num_examples), so it is the released one: under DP the
    plan's batch size x local steps, never the site's exact count."""
    from clients.secagg_app import secagg_weight
    from fedssl.fl.keys import STATUS_REFUSED, STATUS_TRAINED
    from fedssl.fl.plan import TrainPlan
    from fedssl.fl.records import RoundResult
    from fedssl.fl.site_reply import site_reply_records

    plan = TrainPlan(run_id="t", server_round=1, planned_rounds=2, pretext="rotation", encoder="cnn", width=8, depth=2,
                     local_steps=5, batch_size=32, lr=0.1)

    def released(status: str, dp: bool) -> dict:
        result = RoundResult(status=status, encoder_state=None, num_examples=420)
        return dict(site_reply_records(result, site_id=0, dp_enabled=dp, plan=plan)[keys.METRICS])

    plain, private = released(STATUS_TRAINED, dp=False), released(STATUS_TRAINED, dp=True)
    assert secagg_weight(plain, "examples", 1000) == 420
    assert secagg_weight(plain, "examples", 300) == 300  # capped at max_weight
    assert secagg_weight(private, "examples", 1000) == 160  # 32 x 5, whatever the site holds
    assert secagg_weight(private, "uniform", 1) == secagg_weight(plain, "uniform", 1) == 1
    for dp in (False, True):
        refused = released(STATUS_REFUSED, dp)
        assert secagg_weight(refused, "examples", 1000) == 0 and secagg_weight(refused, "uniform", 1) == 0


def test_refused_site_sends_a_data_independent_vector() -> None:
    """Weight 0: Flower's own masking step turns *any* weights into the same masked vector."""
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.app import ConfigRecord
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, _collect_masked_vectors
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    target, modulus = 2**22, 2**32
    state = SecAggPlusState()
    state.nid, state.threshold, state.max_weight = 1, 1, 1000.0
    state.clipping_range, state.target_range, state.mod_range = 8.0, target, modulus
    state.rd_seed = bytes(range(32))
    configs = ConfigRecord({Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []})
    rng = np.random.default_rng(0)
    one = [rng.normal(size=(8, 1, 3, 3)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)]
    other = [rng.normal(size=(8, 1, 3, 3)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)]

    def masked(params, weight):
        out = _collect_masked_vectors(state, configs, weight, ndarrays_to_parameters(params))
        return [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]

    refused_one, refused_other = masked(one, 0), masked(other, 0)
    assert all(np.array_equal(a, b) for a, b in zip(refused_one, refused_other))
    # Without the mask: weight 0 and every entry quantize(0) = target/2, whatever the weights were.
    mask = pseudo_rand_gen(state.rd_seed, modulus, [a.shape for a in refused_one])
    plain = [(a.astype(np.int64) - m.astype(np.int64)) % modulus for a, m in zip(refused_one, mask)]
    assert int(plain[0][0]) == 0 and all(np.all(p == target // 2) for p in plain[1:])
    # A contributing site's vector does depend on its weights.
    assert not all(np.array_equal(a, b) for a, b in zip(masked(one, 420), masked(other, 420)))


# ----------------------------------------------------------------- slow: a real SecAgg+ federation

@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    from flower_tap import Tap, run_tapped

    monkeypatch = pytest.MonkeyPatch()
    try:
        config = load_config(TINY, [f"federation.num_sites={NUM_SITES}", f"federation.rounds={ROUNDS}", "run.name=secagg", *SECAGG])
        run_dir, tap_dir = run_tapped(config, tmp_path_factory.mktemp("secagg"), monkeypatch, drop=DROP, refuse=REFUSE)
    finally:
        monkeypatch.undo()
    return config, run_dir, Tap.load(tap_dir)


def _aggregate_after(run_dir, tap, server_round: int) -> dict[str, np.ndarray]:
    """The global encoder the server released after ``server_round`` (what sites got next)."""
    if server_round < ROUNDS:
        return tap.sites[(server_round + 1, 1)]["global"]
    return {k: v.numpy() for k, v in torch.load(run_dir / "encoder.pt").items()}


def _contributors(tap, server_round: int) -> list[dict]:
    return [r for (rnd, _), r in sorted(tap.sites.items()) if rnd == server_round and r["status"] == "trained" and not r["dropped"]]


def _site_of_node(tap) -> dict[int, int]:
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    mapping = {}
    for exchange in _stage(tap, Stage.COLLECT_MASKED_VECTORS):
        for reply in exchange["received"]:
            if not reply["error"]:
                mapping[reply["src"]] = int(reply["configs"]["fitres.metrics"][keys.SITE_ID])
    return mapping


def _stage(tap, stage: str) -> list[dict]:
    return tap.stage_exchanges(stage)


@pytest.mark.slow
def test_server_never_receives_a_site_update_in_the_clear(secagg_run) -> None:
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    config, run_dir, tap = secagg_run
    sa = config.secure_aggregation
    # 1. No reply of any stage carried an array: the mod empties the FitRes ArrayRecord.
    assert tap.replies() and all(not rec for reply in tap.replies() for rec in reply["arrays"].values())
    # 2. What a site sends in the collect stage is uniform noise mod 2**32, unrelated to its weights.
    site_of = _site_of_node(tap)
    for server_round, exchange in enumerate(_stage(tap, Stage.COLLECT_MASKED_VECTORS), start=1):
        for reply in exchange["received"]:
            if reply["error"]:
                continue
            site = site_of[reply["src"]]
            truth = tap.sites[(server_round, site)]
            if truth["status"] != "trained":
                continue
            masked = [bytes_to_ndarray(b) for b in reply["configs"][RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            vector = np.concatenate([m.ravel() for m in masked[1:]]).astype(np.float64)
            weight = min(truth["num_examples"], sa.max_weight) / sa.max_weight
            true_vector = np.concatenate([truth["trained"][k].ravel() for k in truth["trained"]]).astype(np.float64)
            quantized_truth = (np.clip(weight * true_vector, -sa.clipping_range, sa.clipping_range) + sa.clipping_range) * (
                sa.quantization_range / (2 * sa.clipping_range))
            assert np.mean(vector < sa.quantization_range) < 0.05  # unmasked, every entry would be below it
            assert abs(np.corrcoef(vector, quantized_truth)[0, 1]) < 0.2
            # Decoding the masked vector as if it were the site's update gives noise, not the update.
            decoded = np.concatenate([d.ravel() for d in dequantize(masked[1:], sa.clipping_range, sa.quantization_range)]) / weight
            assert np.mean(np.abs(decoded - true_vector)) > 1.0


@pytest.mark.slow
def test_only_the_aggregate_equals_fedavg_within_quantization_error(secagg_run, record_property) -> None:
    from flower_tap import max_abs_diff, weighted_mean

    config, run_dir, tap = secagg_run
    sa = config.secure_aggregation
    step = 2 * sa.clipping_range / sa.quantization_range  # one quantization level
    for server_round in range(1, ROUNDS + 1):
        sites = _contributors(tap, server_round)
        weights = [min(s["num_examples"], sa.max_weight) for s in sites]
        fedavg = weighted_mean([s["trained"] for s in sites], weights)
        secure = _aggregate_after(run_dir, tap, server_round)
        error = max_abs_diff(fedavg, secure)
        # Stochastic rounding moves each site's scaled weights by < 1 level; the mean divides by Σ w/max_weight.
        bound = len(sites) * step / (sum(weights) / sa.max_weight) + 1e-6  # + float32 rounding
        spread = min(max_abs_diff(s["trained"], secure) for s in sites)
        record_property(f"round{server_round}_quantization_error", error)
        print(f"round {server_round}: {len(sites)} sites, |SecAgg+ - FedAvg|max = {error:.2e} (bound {bound:.2e}); "
              f"nearest single site differs by {spread:.2e}")
        assert error <= bound
        assert spread > 100 * error  # the aggregate is the sum, not any one site's update


@pytest.mark.slow
def test_dropout_mid_round_and_refusal_still_complete_the_round(secagg_run) -> None:
    from fedssl.layout import RunDir
    from fedssl.runlog import read_metrics

    config, run_dir, tap = secagg_run
    site_rounds, round_records = read_metrics(RunDir(run_dir).metrics)
    rounds = {r.round: r for r in round_records}
    assert sorted(rounds) == [1, 2, 3]
    assert (rounds[1].num_trained, rounds[2].num_trained, rounds[3].num_trained) == (3, 2, 2)
    assert any(r.round == 2 and r.status == "failed" for r in site_rounds)  # the dropout, recorded
    assert any(r.round == 3 and r.site_id == 0 and r.status == "refused" for r in site_rounds)
    # The dropped site trained (and was charged) but its update is not in round 2's aggregate.
    assert tap.sites[(2, 2)]["dropped"] and tap.sites[(2, 2)]["trained"] is not None
    assert {s["site"] for s in _contributors(tap, 2)} == {0, 1}
    assert {s["site"] for s in _contributors(tap, 3)} == {1, 2}
    assert (run_dir / "encoder.pt").exists()


@pytest.mark.slow
def test_unmask_stage_never_reveals_both_secrets_of_a_site(secagg_run) -> None:
    """Shares of a survivor's private mask seed, or of a dropped site's mask key: never both."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    _, _, tap = secagg_run
    for server_round, (collect, unmask) in enumerate(zip(_stage(tap, Stage.COLLECT_MASKED_VECTORS), _stage(tap, Stage.UNMASK)), start=1):
        delivered = {r["src"] for r in collect["received"] if not r["error"]}
        asked = [m["configs"][RECORD_KEY_CONFIGS] for m in unmask["sent"]]
        active = set().union(*(set(a[Key.ACTIVE_NODE_ID_LIST]) for a in asked))
        dead = set().union(*(set(a[Key.DEAD_NODE_ID_LIST]) for a in asked))
        assert not active & dead
        assert active == delivered  # only sites whose masked vector is in the sum
        assert len(dead) == (1 if server_round == 2 else 0)


@pytest.mark.slow
def test_scalars_in_the_clear_are_the_whitelisted_ones(secagg_run) -> None:
    """Per-site ε and status still reach the server in the clear (the privacy statement says so)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    _, _, tap = secagg_run
    for exchange in _stage(tap, Stage.COLLECT_MASKED_VECTORS):
        for reply in exchange["received"]:
            if reply["error"]:
                continue
            metrics = reply["configs"]["fitres.metrics"]
            assert set(metrics) <= keys.ALLOWED_METRICS
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
            weight = reply["metrics"]["fitres.num_examples"]["num_examples"]
            assert weight == (0 if metrics[keys.STATUS] == keys.STATUS_CODES["refused"] else metrics[keys.NUM_EXAMPLES])


@pytest.mark.slow
def test_ledgers_audit_and_statement_under_secagg(secagg_run) -> None:
    from fedssl.audit.ledgers import audit_path
    from fedssl.layout import RunDir
    from fedssl.privacy.site_level import privacy_facts

    _, run_dir, _ = secagg_run
    report = audit_path(run_dir)
    assert report.ok, [str(f) for s in report.sites for f in s.findings]
    assert "SecAgg+" in report.statement and "in the clear" in report.statement
    assert privacy_facts(RunDir(run_dir).server_ledger) == {"secure_aggregation": True, "site_level": None}
    # Every site's accountant kept counting across the SecAgg+ rounds (the dropped round too).
    steps = {s.site_id: sum(e.recorded.steps for e in s.events) for s in report.sites}
    assert steps["site-002"] == 3 * 3 and steps["site-000"] == 2 * 3  # site 0 refused round 3
    assert all(math.isfinite(s.epsilon_stated) for s in report.sites)
