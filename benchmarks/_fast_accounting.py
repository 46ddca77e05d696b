"""The proposed privacy-accounting speed-up, applied by monkeypatching so benchmarks can
measure it before it lands in fedssl/privacy/analysis.py.

Why: Opacus' RDP accountant recomputes the Rényi DP of every event for ~150 orders on every
``get_epsilon`` call, and the fractional orders are pure-Python series: ~0.4 s per call here.
A site calls it twice per round (``charge``: ε spent and ε after) over a history that grows
by one event per round, and ``calibrate`` runs a whole binary search of such calls (~2-4 s)
the first time each site trains — in the 10-site demo that was 80 s of a 118 s replay,
against 36 s of actual DP-SGD steps.

What changes (results bit-identical for RDP, checked by :func:`check_identical`):
- ``epsilon_of`` for ``rdp``: the per-step RDP vector of each distinct (σ, q) is computed once
  and cached; an event of ``n`` steps contributes ``n *`` that vector, which is exactly what
  ``opacus.accountants.analysis.rdp.compute_rdp`` returns (it multiplies by ``steps`` last),
  summed in the same order, then the same ``get_privacy_spent``;
- ``noise_for_budget``: memoised — a pure function of (ε, δ, q, steps, accountant), so sites
  sharing a budget and sample rate calibrate once per process.
Other accountants (prv, gdp) go through the original code path.
"""

from __future__ import annotations

import functools

import numpy as np

_ORIGINALS: dict[str, object] = {}


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.setflags(write=False)
    return rdp


def fast_epsilon_of(history, delta: float, accountant: str = "rdp") -> float:
    from fedssl.privacy import analysis

    if accountant != "rdp":
        return _ORIGINALS["epsilon_of"](history, delta, accountant)  # type: ignore[operator]
    analysis._check_accountant(accountant)
    if not history:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum(_rdp_per_step(float(q), float(s)) * int(n) for s, q, n in history)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def fast_noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, planned_steps: int, accountant: str = "rdp") -> float:
    return _ORIGINALS["noise_for_budget"](target_epsilon, delta, sample_rate, planned_steps, accountant)  # type: ignore[operator]


def install() -> None:
    """Patch fedssl.privacy.{analysis,accountant,budget} in this process (idempotent)."""
    from fedssl.privacy import accountant, analysis, budget

    if _ORIGINALS:
        return
    _ORIGINALS["epsilon_of"] = analysis.epsilon_of
    _ORIGINALS["noise_for_budget"] = analysis.noise_for_budget
    analysis.epsilon_of = fast_epsilon_of
    accountant.epsilon_of = fast_epsilon_of
    analysis.noise_for_budget = fast_noise_for_budget
    budget.noise_for_budget = fast_noise_for_budget


def uninstall() -> None:
    from fedssl.privacy import accountant, analysis, budget

    if not _ORIGINALS:
        return
    analysis.epsilon_of = accountant.epsilon_of = _ORIGINALS["epsilon_of"]
    analysis.noise_for_budget = budget.noise_for_budget = _ORIGINALS["noise_for_budget"]
    _ORIGINALS.clear()


def check_identical() -> dict[str, float]:
    """ε from the patched path vs Opacus' own RDPAccountant on representative histories."""
    from opacus.accountants import RDPAccountant

    histories = [
        [(1.1, 0.25, 20)],
        [(1.1, 0.25, 20)] * 10,
        [(0.8, 0.25, 20), (0.8, 0.2, 20), (2.5, 0.01, 400)],
    ]
    worst = 0.0
    for history in histories:
        acc = RDPAccountant()
        acc.history = list(history)
        reference = acc.get_epsilon(delta=1e-5)
        worst = max(worst, abs(fast_epsilon_of(history, 1e-5) - reference) / reference)
    return {"max_rel_diff_vs_opacus": worst}


SITECUSTOMIZE = '''\
# Written by benchmarks/federation_overhead.py: applies the proposed accounting speed-up in
# every process of a simulation (Ray workers included) when fedssl.privacy.budget is imported.
import importlib.abc, importlib.util, sys

class _FedsslFastAccounting(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "fedssl.privacy.budget":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module
        def exec_module(module, _original=original):
            _original(module)
            sys.modules[name] = module
            import _fast_accounting
            _fast_accounting.install()
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _FedsslFastAccounting())
'''
