"""Will a site accept the coordinator's plan? The site's policy (fedssl.privacy.policy) and noise floor,
applied to a planned run before anything starts, and without torch.

A site calibrates σ once so that the whole planned run (rounds x local steps) spends exactly its
target ε (fedssl.privacy.budget), then refuses a σ below its ``privacy.min_noise_multiplier``. So a
plan is refused when, at the floor σ, it would spend *less* than the target: too few steps for the
budget. ε at the floor is the sites' own RDP arithmetic (:func:`epsilon_at`); with
``privacy.accountant: prv`` the sites' ε is lower still, so a plan this check refuses is refused there
too, while one just past the line may still be refused there.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fedssl.privacy.settings import PrivacyConfig

# Opacus' RDPAccountant.DEFAULT_ALPHAS (a test holds them equal): the orders the sites' ε is minimised over.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def poisson_sample_rate(num_samples: int, batch_size: int) -> float:
    """The rate Opacus' accountant books for a Poisson loader of this batch size, which the site must charge.

    Opacus samples each row at 1/k (k = ceil(N / B) batches of the plain loader) but its Poisson loader has
    int(1 / (1/k)) batches and the accountant books 1 / that. For some k (93, 99, 105, ..., 3125, ...; ~6 % of
    them) float rounding makes it k - 1: Opacus then books 1/(k - 1), above the rate it samples at (so sound,
    slightly conservative), and a site charging 1/k would find the steps taken differ from the steps charged and
    discard its trained round. Charging what Opacus books keeps the two equal.
    """
    batches = math.ceil(num_samples / batch_size)
    return 1.0 / int(1 / (1 / batches))


def epsilon_at(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The ε the sites' RDP accountant gives ``steps`` Poisson-subsampled Gaussian steps (Opacus' orders and conversion)."""
    rdp = [r * steps for r in _per_step_rdp(float(sample_rate), float(noise_multiplier))]
    with warnings.catch_warnings():  # "optimal order is the smallest alpha": the sites' accountant says it too
        warnings.simplefilter("ignore")
        eps, _ = _opacus_rdp().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _per_step_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """One step's RDP at every order; a run's is this times its steps (the search for rounds reuses it)."""
    rdp = _opacus_rdp().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS))
    return tuple(float(r) for r in rdp)


@functools.cache
def _opacus_rdp() -> ModuleType:
    """opacus/accountants/analysis/rdp.py, the sites' own RDP math (numpy and scipy only), loaded as a file.

    Importing it by name would run opacus/__init__.py first, which imports torch (seconds): loading the
    one file keeps the preflight torch-free and its arithmetic identical to the sites' (fedssl.privacy.analysis).
    An integer-order re-implementation was tried and dropped: at small σ the optimal order is fractional,
    and it overstated ε up to tenfold.
    """
    package = importlib.util.find_spec("opacus")  # locates the package without importing it
    assert package is not None and package.submodule_search_locations, "opacus is a dependency of fedssl"
    path = Path(list(package.submodule_search_locations)[0]) / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("fedssl_preflight_opacus_rdp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class PlannedRun:
    """What the coordinator will ask of one site: its rows (as the site counts them) and the plan's shape."""

    site_rows: int
    batch_size: int
    local_steps: int
    rounds: int

    @property
    def sample_rate(self) -> float:
        return poisson_sample_rate(self.site_rows, self.batch_size)

    @property
    def planned_steps(self) -> int:
        return self.rounds * self.local_steps


def plan_problems(spec: PrivacyConfig, plan: PlannedRun) -> list[tuple[str, str]]:
    """(config key, problem and fix) for each rule of the site's policy the plan breaks; [] when it fits."""
    if not spec.enabled:
        return []
    q = plan.sample_rate
    problems = []
    if q > spec.max_sample_rate:
        largest = max(1, math.floor(spec.max_sample_rate * plan.site_rows))
        problems.append(("training.batch_size", f"{plan.batch_size} samples {q:.3g} of a site's ~{plan.site_rows} rows per step, "
                         f"above privacy.max_sample_rate={spec.max_sample_rate:g}; use training.batch_size <= {largest} "
                         "(or raise privacy.max_sample_rate)"))
    if plan.local_steps > spec.max_local_steps:
        problems.append(("training.local_steps", f"{plan.local_steps} DP-SGD steps per round, above privacy.max_local_steps="
                         f"{spec.max_local_steps}; lower training.local_steps (or raise privacy.max_local_steps)"))
    if plan.rounds > spec.max_rounds_per_run:
        problems.append(("federation.rounds", f"{plan.rounds} rounds, above privacy.max_rounds_per_run={spec.max_rounds_per_run}; "
                         "lower federation.rounds (or raise privacy.max_rounds_per_run)"))
    if not problems and (floor := _noise_floor_problem(spec, plan)) is not None:
        problems.append(floor)
    return problems


def _noise_floor_problem(spec: PrivacyConfig, plan: PlannedRun) -> tuple[str, str] | None:
    floor, q = spec.min_noise_multiplier, plan.sample_rate
    spent = epsilon_at(floor, q, plan.planned_steps, spec.delta)
    if spent >= spec.target_epsilon:
        return None
    fix = f"lower privacy.target_epsilon to <= {math.floor(spent * 100) / 100:g} or privacy.min_noise_multiplier"
    if (rounds := _fewest_rounds(spec, plan)) is not None:
        fix = f"plan at least {rounds} federation.rounds (or more training.local_steps), or {fix}"
    return ("privacy.min_noise_multiplier",
            f"federation.rounds={plan.rounds} x training.local_steps={plan.local_steps} at sample rate {q:.3g} "
            f"(batch {plan.batch_size} of a site's ~{plan.site_rows} rows) spend only epsilon {spent:.2f} at the site's noise "
            f"floor sigma={floor:g}, so fitting privacy.target_epsilon={spec.target_epsilon:g} needs less noise and the site "
            f"refuses the plan; {fix}")


def _fewest_rounds(spec: PrivacyConfig, plan: PlannedRun) -> int | None:
    """The fewest rounds (up to the site's max_rounds_per_run) whose steps spend the target at the floor σ."""
    low, high = plan.rounds + 1, spec.max_rounds_per_run
    enough = lambda rounds: epsilon_at(spec.min_noise_multiplier, plan.sample_rate, rounds * plan.local_steps,  # noqa: E731
                                       spec.delta) >= spec.target_epsilon
    if low > high or not enough(high):
        return None
    while low < high:  # ε grows with the steps: bisect
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle + 1, high)
    return low
