"""Privacy settings: a site's own DP-SGD budget and policy, SecAgg+, and site-level DP.

Owned here, re-exported by fedssl.config (which assembles every section of an experiment). Like
fedssl.config this imports no training code, so a ServerApp or an auditor may load it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedssl.typed_yaml import check


# Per-sample clipping engines; both clip exactly, with Opacus' noise and accounting.
CLIPPING_ENGINES = ("bookkeeping", "opacus")
# Privacy accountants a site may use. Opacus' "gdp" is left out on purpose: it under-reports ε for
# Poisson-subsampled DP-SGD (the audit measured 1.56 where PLD gives 2.18).
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacyConfig:
    """A site's own privacy settings, end to end: from its YAML to its budget and its training.

    Frozen: nothing downstream (and nothing the server sends) can change a site's budget."""

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"  # one of ACCOUNTANTS
    # One of CLIPPING_ENGINES. bookkeeping: fedssl.training.bookkeeping, one backward pass without
    # ordinary weight gradients (faster: benchmarks/README.md section 1); opacus: Opacus' hooks mode.
    clipping: str = "bookkeeping"
    # What a coordinator's plan may ask (fedssl.privacy.policy); outside it the round is refused. Else the
    # coordinator picks σ through its first plan: one full-batch step would spend the whole budget at once.
    min_noise_multiplier: float = 0.8  # σ below this is refused, whatever budget the plan would fit
    max_sample_rate: float = 0.5  # Poisson rate batch_size / site size; 1 = every row in every step
    max_local_steps: int = 1000  # DP-SGD steps in one round
    max_rounds_per_run: int = 100  # rounds one run (run id) may train here
    max_epsilon_per_run: float | None = None  # ε one run may spend of the lifetime target_epsilon; null = no cap

    def validate(self) -> None:
        if not self.enabled:
            return
        self._validate_policy()
        check(0 < self.target_epsilon < math.inf, "privacy.target_epsilon",
              "must be a finite number > 0 (for no DP set privacy.enabled=false)", self.target_epsilon)
        check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1), typically below 1/num_samples", self.delta)
        check(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0", self.max_grad_norm)
        check(self.accountant in ACCOUNTANTS, "privacy.accountant", f"valid choices: {', '.join(sorted(ACCOUNTANTS))}", self.accountant)
        check(self.clipping in CLIPPING_ENGINES, "privacy.clipping", f"valid choices: {', '.join(CLIPPING_ENGINES)}", self.clipping)

    def _validate_policy(self) -> None:
        check(0 < self.min_noise_multiplier < math.inf, "privacy.min_noise_multiplier",
              "must be a finite number > 0 (the smallest σ this site accepts; 0.8 by default)", self.min_noise_multiplier)
        check(0 < self.max_sample_rate <= 1, "privacy.max_sample_rate", "must be in (0, 1] (0.5 by default)", self.max_sample_rate)
        for key in ("max_local_steps", "max_rounds_per_run"):
            check(getattr(self, key) >= 1, f"privacy.{key}", "must be an integer >= 1", getattr(self, key))
        check(self.max_epsilon_per_run is None or 0 < self.max_epsilon_per_run < math.inf, "privacy.max_epsilon_per_run",
              "must be a finite number > 0, or null for no per-run cap", self.max_epsilon_per_run)


@dataclass
class SecureAggregationConfig:
    """Flower's SecAgg+ (legacy workflow + client mod): the server learns only the sum of site updates."""

    enabled: bool = False
    # Shares per site secret: a whole number >= 3, or a fraction in (0, 1] of the sites sampled per round.
    num_shares: float = 1.0
    # Shares needed to reconstruct a secret: a whole number >= 2 (below num_shares), or a fraction in (0, 1]
    # of num_shares. More = safer against colluding sites; fewer = more dropouts tolerated.
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0  # weights are clipped to [-r, r] before quantization
    quantization_range: int = 4194304  # 2**22 levels over [-r, r]
    modulus_range: int = 4294967296  # 2**32: masks are uniform mod this
    max_weight: float = 1000.0  # largest FedAvg weight (examples) a site sends; larger ones are capped
    # Seconds to wait per protocol stage. None waits for every sampled site: fine in simulation (a crashed
    # site answers with an error), but in a deployment set it, or a site that vanishes stalls the round.
    timeout: float | None = None

    def validate(self) -> None:
        if not self.enabled:
            return
        shares, threshold = self.num_shares, self.reconstruction_threshold
        check(0 < shares <= 1 or (shares >= 3 and float(shares).is_integer()), "secure_aggregation.num_shares",
              "must be a fraction in (0, 1] of the sampled sites or a whole number >= 3", shares)
        check(0 < threshold <= 1 or (threshold >= 2 and float(threshold).is_integer()), "secure_aggregation.reconstruction_threshold",
              "must be a fraction in (0, 1] of num_shares or a whole number >= 2", threshold)
        if shares > 1 and threshold > 1:
            check(threshold < shares, "secure_aggregation.reconstruction_threshold",
              f"must be below secure_aggregation.num_shares ({shares:g})", threshold)
        check(self.clipping_range > 0, "secure_aggregation.clipping_range", "must be > 0", self.clipping_range)
        check(self.quantization_range >= 2, "secure_aggregation.quantization_range", "must be an integer >= 2", self.quantization_range)
        check(
            self.modulus_range > self.quantization_range and self.modulus_range & (self.modulus_range - 1) == 0
            and self.modulus_range <= 2**32,
            "secure_aggregation.modulus_range",
            "must be a power of 2 above quantization_range and at most 2**32",
            self.modulus_range,
        )
        check(self.max_weight > 0, "secure_aggregation.max_weight", "must be > 0", self.max_weight)
        check(self.timeout is None or self.timeout > 0, "secure_aggregation.timeout", "must be > 0 seconds or null", self.timeout)


@dataclass
class SiteDPConfig:
    """Site-level (central) DP: each site's round update is clipped, the server noises the mean."""

    enabled: bool = False
    side: str = "client"  # where updates are clipped: client (Flower fixedclipping_mod) | server
    clipping_norm: float = 1.0  # L2 bound on one site's update (its weights minus the global) per round
    noise_multiplier: float | None = None  # sigma: noise std = sigma * clipping_norm on the sum of updates
    target_epsilon: float | None = None  # budget for the run; without noise_multiplier, sigma is calibrated to it
    delta: float = 1.0e-5

    def validate(self) -> None:
        if not self.enabled:
            return
        check(self.side in ("client", "server"), "site_dp.side", "valid choices: client, server", self.side)
        check(self.clipping_norm > 0, "site_dp.clipping_norm", "must be > 0", self.clipping_norm)
        check(self.noise_multiplier is not None or self.target_epsilon is not None, "site_dp.noise_multiplier",
              "set it (or site_dp.target_epsilon to calibrate it)", self.noise_multiplier)
        check(self.noise_multiplier is None or 0 < self.noise_multiplier < math.inf, "site_dp.noise_multiplier",
               "must be a finite number > 0", self.noise_multiplier)
        check(self.target_epsilon is None or 0 < self.target_epsilon < math.inf, "site_dp.target_epsilon",
               "must be a finite number > 0", self.target_epsilon)
        check(0 < self.delta < 1, "site_dp.delta", "must be in (0, 1), well below 1/federation.num_sites", self.delta)
