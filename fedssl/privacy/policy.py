"""The site's policy on what a coordinator's plan may ask of it: pure checks, no files.

The coordinator chooses batch size, steps and rounds; without a policy it thereby chooses the
noise too (σ is calibrated from its first plan), and a one-step full-batch plan would spend a
site's whole lifetime budget in one release. Each check here takes the site's own ``privacy:``
settings and returns a :class:`Refusal` naming the rule (the config key) and the fix, or None.
fedssl.privacy.budget runs them under the site's budget lock before anything is charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedssl.privacy.settings import PrivacyConfig

# Not a setting: a round this run already trained (replay) or one behind it. Charges are keyed by (run id,
# round) in the site's ledger. A coordinator resumed from its checkpoint (fedssl.run.checkpoint) keeps the run
# id and re-sends the round after its checkpoint; a site that already charged that round (its reply was lost
# in the crash) refuses it here, before anything is charged: it is not charged twice. The site does not
# re-train it either: a re-trained round is a new release (fresh noise, fresh Poisson sample) and would have
# to be charged again, and the site keeps no copy of the update it released that could be re-sent for free.
# The resumed round goes on with the other sites; a fresh run (a new run id) trains and charges anew.
ROUND_ORDER = "round order"


@dataclass(frozen=True)
class RoundRequest:
    """What one training message asks of this site, as the site measures it (its own data size)."""

    run_id: str
    server_round: int
    planned_rounds: int
    sample_rate: float  # Poisson rate: the plan's batch size over this site's rows
    steps: int  # DP-SGD steps this round

    @property
    def planned_steps(self) -> int:
        """Steps of the whole planned run, which σ is calibrated for the first time the site trains."""
        return self.planned_rounds * self.steps


@dataclass(frozen=True)
class Refusal:
    rule: str  # the setting that refuses (e.g. privacy.max_sample_rate), or ROUND_ORDER
    reason: str  # one line: what the plan asked, the limit, and the fix

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


def check_request(spec: PrivacyConfig, request: RoundRequest, charged_rounds: Sequence[int]) -> Refusal | None:
    """The plan's shape against the policy; ``charged_rounds``: the rounds this run already charged here."""
    q, steps, rounds = request.sample_rate, request.steps, request.planned_rounds
    if q > spec.max_sample_rate:
        return Refusal(
            "privacy.max_sample_rate",
            f"the plan's batch size samples {q:.3g} of this site's rows per step, above the site's cap {spec.max_sample_rate:g}; "
            "ask the coordinator for a smaller training.batch_size (or raise privacy.max_sample_rate in site.yaml)",
        )
    if steps > spec.max_local_steps:
        return Refusal(
            "privacy.max_local_steps",
            f"the plan asks {steps} DP-SGD steps in one round, above the site's cap {spec.max_local_steps}; "
            "ask the coordinator for fewer training.local_steps (or raise privacy.max_local_steps)",
        )
    if rounds > spec.max_rounds_per_run or len(charged_rounds) >= spec.max_rounds_per_run:
        return Refusal(
            "privacy.max_rounds_per_run",
            f"run {request.run_id} plans {rounds} round(s) and trained {len(charged_rounds)} here; the site allows "
            f"{spec.max_rounds_per_run} per run. Ask the coordinator for fewer federation.rounds (or raise privacy.max_rounds_per_run)",
        )
    if charged_rounds and request.server_round <= max(charged_rounds):
        return Refusal(
            ROUND_ORDER,
            f"run {request.run_id} already trained round {max(charged_rounds)} here; round {request.server_round} "
            "repeats or goes back (a replayed or reordered plan). Start a new run to train again",
        )
    return None


def check_noise(spec: PrivacyConfig, noise_multiplier: float) -> Refusal | None:
    """σ (calibrated from the plan the first time the site trains) against the site's noise floor."""
    if noise_multiplier >= spec.min_noise_multiplier:
        return None
    return Refusal(
        "privacy.min_noise_multiplier",
        f"the plan's rounds x steps at this sample rate fit the budget with noise multiplier {noise_multiplier:.3g}, "
        f"below the site's floor {spec.min_noise_multiplier:g}; ask the coordinator for more rounds or steps, or a smaller "
        "batch (or lower privacy.min_noise_multiplier)",
    )


def check_run_epsilon(spec: PrivacyConfig, run_id: str, run_epsilon_after: float, slack: float) -> Refusal | None:
    """ε this run would have spent here after the round, against the site's per-run cap."""
    cap = spec.max_epsilon_per_run
    if cap is None or run_epsilon_after <= cap * (1 + slack):
        return None
    return Refusal(
        "privacy.max_epsilon_per_run",
        f"run {run_id} would reach epsilon {run_epsilon_after:.3f} here, above the site's per-run cap {cap:g}; "
        "the site trains this run no further (raise privacy.max_epsilon_per_run to allow more)",
    )
