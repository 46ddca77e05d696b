"""Empirical privacy audit: a canary membership attack turned into a lower bound on ε.

Method (Jagielski, Ullman & Oprea, NeurIPS 2020, "Auditing Differentially Private Machine
Learning: How Private is Private SGD?"; Nasr et al., IEEE S&P 2021, "Adversary
Instantiation"): craft 2m distinctive canaries, insert a random half into one site's data,
run that site's *real* training code (``train_round``, the run's exact DP settings, every
planned round), then score every canary. Two attacks:

- ``gradient`` (default; white-box, the threat DP-SGD is meant to stop): gradient canaries
  (fedssl.audit.canaries; Nasr et al., USENIX Security 2023, "Tight Auditing of
  Differentially Private Machine Learning"). Each canary's loss puts its whole gradient on one
  encoder weight of its own; whoever sees the site's updates (the server, without SecAgg)
  reads that weight's movement summed over all rounds. Members move theirs, non-members do not.
- ``loss`` (black-box, final model only): input-space canaries scored by their pretext loss
  under the final model; members score lower. Weak on small self-supervised models, which
  barely memorise random patterns (AUC about 0.5-0.7 without DP): kept for that threat model.

For a threshold on the score, an (ε, δ)-DP mechanism forces

    TPR ≤ e^ε · FPR + δ    and    (1 − FPR) ≤ e^ε · (1 − TPR) + δ,

so one-sided Clopper–Pearson bounds on TPR and FPR give a high-confidence lower bound
ε_lb = log((TPR_lo − δ) / FPR_hi). The threshold is chosen on one half of the canaries and
the bound computed on the other half, so choosing the best threshold does not inflate it.

A lower bound far below the claimed ε is expected (DP-SGD's analysis is worst-case); a lower
bound *above* the claimed ε would mean the implementation or the accounting is broken. With
DP off the same attack must find a clearly positive bound — otherwise the audit is vacuous.
With perfect separation the bound is capped by the number of canaries (``bound_ceiling``:
about 2.6 for 200, 4.2 for 1000): a no-DP bound at its ceiling means "no privacy at all".

The command line, `fedssl audit --empirical CONFIG`, is fedssl.audit.cli's.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score

from fedssl.config import ExperimentConfig
from fedssl.data.dataset import SiteDataset
from fedssl.data.pixels import unit_float
from fedssl.errors import ConfigError
from fedssl.experiment import simulated_site_from_config
from fedssl.models import encoder_for
from fedssl.pretext import PretextModel
from fedssl.progress import tick
from fedssl.audit.canaries import GradientCanaries
from fedssl.training.local import SiteSettings, build_pretext_model, restore_site_parts, train_round
from fedssl.fl.plan import plan_from_config


ATTACKS = ("gradient", "loss")
# Below this, the attack on a non-private model learnt nothing: the audit says nothing.
VACUOUS_BOUND = 0.5


@dataclass(frozen=True)
class EmpiricalAudit:
    attack: str
    dp_enabled: bool
    claimed_epsilon: float | None
    delta: float
    num_canaries: int
    confidence: float
    epsilon_lower_bound: float
    bound_ceiling: float  # the bound perfect separation would give at this canary count
    tpr: float
    fpr: float
    threshold: float
    member_score_mean: float
    nonmember_score_mean: float
    auc: float  # attack ROC AUC over all canaries: 0.5 = no signal (diagnostic, not a bound)
    rounds: int
    steps_per_round: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        claim = f"claimed eps {self.claimed_epsilon:.3f}" if self.claimed_epsilon is not None else "no DP claimed"
        verdict = ""
        if self.claimed_epsilon is not None:
            verdict = " OK (below the claim)" if self.epsilon_lower_bound <= self.claimed_epsilon else " VIOLATION (above the claim)"
        return (
            f"empirical eps lower bound {self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence "
            f"(at most {self.bound_ceiling:.2f} with {self.num_canaries} canaries; {self.attack} attack, "
            f"TPR {self.tpr:.2f} / FPR {self.fpr:.2f}, AUC {self.auc:.2f}); {claim}{verdict}"
        )


# ------------------------------------------------------------------ pure statistics


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 − alpha) confidence interval for a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def epsilon_lower_bound(tp: int, fp: int, members: int, nonmembers: int, delta: float, alpha: float) -> float:
    """High-confidence ε lower bound from one threshold's confusion counts (0 if none)."""
    tpr_lo, _ = clopper_pearson(tp, members, alpha)
    _, fpr_hi = clopper_pearson(fp, nonmembers, alpha)
    tnr_lo, fnr_hi = 1.0 - fpr_hi, 1.0 - tpr_lo
    bounds = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        bounds.append(math.log((tpr_lo - delta) / fpr_hi))
    if tnr_lo - delta > 0 and fnr_hi > 0:
        bounds.append(math.log((tnr_lo - delta) / fnr_hi))
    return max(bounds)


def best_threshold(member_scores: np.ndarray, nonmember_scores: np.ndarray, delta: float, alpha: float) -> float:
    """Threshold (predict member if score < t) maximising the bound on this data."""
    candidates = np.unique(np.concatenate([member_scores, nonmember_scores]))
    best_t, best_eps = float(candidates[0]), -1.0
    for t in candidates:
        tp = int((member_scores <= t).sum())
        fp = int((nonmember_scores <= t).sum())
        eps = epsilon_lower_bound(tp, fp, len(member_scores), len(nonmember_scores), delta, alpha)
        if eps > best_eps:
            best_t, best_eps = float(t), eps
    return best_t


# ------------------------------------------------------------------ the audit


def make_canaries(count: int, input_shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Sparse random bright-pixel patterns: unlike any real sample and unlike each other, so a
    model that memorised one shows it in that canary's loss, and a batch row is a canary
    exactly when it equals one of them."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand((count, *input_shape), generator=gen) < 0.3
    return mask.float()


def _canary_losses(model: PretextModel, canaries: torch.Tensor, repeats: int, seed: int) -> np.ndarray:
    """Mean pretext loss per canary over ``repeats`` draws of the task's randomness."""
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = torch.stack([model(canaries) for _ in range(repeats)])
    return losses.mean(dim=0).numpy()


def run_empirical_audit(
    config: ExperimentConfig,
    *,
    num_canaries: int = 200,
    attack: str = "gradient",
    site_id: int = 0,
    max_site_samples: int | None = None,
    confidence: float = 0.95,
    score_repeats: int = 16,
    work_dir: Path | None = None,
    progress=None,
) -> EmpiricalAudit:
    """Insert canaries into site ``site_id``, train it with the config's settings, attack."""
    if attack not in ATTACKS:
        raise ConfigError(f"--attack: unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if num_canaries < 8:
        raise ConfigError(f"--canaries: need at least 8 canaries to split into halves, got {num_canaries}")
    say = progress or (lambda _msg: None)
    dataset, settings = simulated_site_from_config(config, site_id)
    rng = np.random.default_rng(config.run.seed + 7919)
    if max_site_samples is not None and len(dataset) > max_site_samples:
        # A smaller site visits each canary more often: the strongest setting for the attack
        # that the site's own mechanism (sigma calibrated for its real sample rate) allows.
        dataset = dataset.subset(np.sort(rng.permutation(len(dataset))[:max_site_samples]))
    canaries = make_canaries(num_canaries, dataset.input_shape, config.run.seed + 104729)
    is_member = np.zeros(num_canaries, dtype=bool)
    is_member[rng.permutation(num_canaries)[: num_canaries // 2]] = True
    ids = tuple(f"canary-{i}" for i in np.flatnonzero(is_member))
    train_set = SiteDataset(
        inputs=torch.cat([unit_float(dataset.inputs), canaries[torch.from_numpy(is_member)]]),
        sample_ids=dataset.sample_ids + ids,
        modality=dataset.modality,
        feature_blocks=dataset.feature_blocks,
    )
    own_dir = work_dir is None
    state_root = Path(tempfile.mkdtemp(prefix="fedssl-audit-")) if own_dir else Path(work_dir)
    try:
        scores = _train_and_score(config, attack, train_set, settings, canaries, state_root, score_repeats, say)
    finally:
        if own_dir:
            shutil.rmtree(state_root, ignore_errors=True)
    return _attack(attack, scores, is_member, config, confidence, rng)


def _train_and_score(config: ExperimentConfig, attack: str, train_set: SiteDataset, settings: SiteSettings,
                     canaries: torch.Tensor, state_dir: Path, score_repeats: int, say) -> np.ndarray:
    """All planned rounds of the site's real training code; returns each canary's score,
    lower meaning "more likely a member" for both attacks."""
    settings = replace(settings, state_dir=state_dir, highwater_path=None)  # its mark with its throwaway state, not the run's
    m = config.model
    encoder = encoder_for(m, train_set.input_shape, seed=config.run.seed)
    plan = plan_from_config(config, run_id="empirical-audit")
    gradient_canaries = None
    if attack == "gradient":
        gradient_canaries = GradientCanaries(canaries, encoder, config.privacy.max_grad_norm, seed=config.run.seed + 15485863)
    state = encoder.state_dict()
    pushed = np.zeros(len(canaries))
    for server_round in range(1, config.federation.rounds + 1):
        result = train_round(train_set, state, plan.with_round(server_round), settings, canaries=gradient_canaries)
        if result.encoder_state is None:
            raise RuntimeError(f"audit training stopped at round {server_round}: {result.reason}")
        if gradient_canaries is not None:
            # What the server sees: the update. A member's Dirac gradient lowers its weight.
            pushed += (gradient_canaries.readout(state) - gradient_canaries.readout(result.encoder_state)).numpy()
        state = result.encoder_state
        tick(say, f"audit training round {server_round}/{config.federation.rounds}", server_round, config.federation.rounds)
    if gradient_canaries is not None:
        return -pushed
    model = build_pretext_model(plan, train_set.input_shape, state, train_set.feature_blocks)
    restore_site_parts(model, settings.state_dir)
    return _canary_losses(model, canaries, score_repeats, seed=config.run.seed)


def _attack(attack: str, scores: np.ndarray, is_member: np.ndarray, config: ExperimentConfig, confidence: float,
            rng: np.random.Generator) -> EmpiricalAudit:
    delta = config.privacy.delta if config.privacy.enabled else 1e-5
    alpha = 1 - confidence
    order = rng.permutation(len(scores))
    choose, evaluate = order[: len(order) // 2], order[len(order) // 2 :]
    t = best_threshold(scores[choose][is_member[choose]], scores[choose][~is_member[choose]], delta, alpha)
    members, nonmembers = scores[evaluate][is_member[evaluate]], scores[evaluate][~is_member[evaluate]]
    tp, fp = int((members <= t).sum()), int((nonmembers <= t).sum())
    return EmpiricalAudit(
        attack=attack,
        dp_enabled=config.privacy.enabled,
        claimed_epsilon=config.privacy.target_epsilon if config.privacy.enabled else None,
        delta=delta,
        num_canaries=len(scores),
        confidence=confidence,
        epsilon_lower_bound=epsilon_lower_bound(tp, fp, len(members), len(nonmembers), delta, alpha),
        bound_ceiling=epsilon_lower_bound(len(members), 0, len(members), len(nonmembers), delta, alpha),
        tpr=tp / max(1, len(members)),
        fpr=fp / max(1, len(nonmembers)),
        threshold=t,
        member_score_mean=float(scores[is_member].mean()),
        nonmember_score_mean=float(scores[~is_member].mean()),
        auc=float(roc_auc_score(is_member, -scores)),
        rounds=config.federation.rounds,
        steps_per_round=config.training.local_steps,
    )
