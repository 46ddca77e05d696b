"""The SecAgg+ path: the server unmasks only the sum of the sites' updates.

In Flower 1.42 SecAgg+ exists only on the legacy path: ``DefaultWorkflow(fit_workflow=
SecAggPlusWorkflow(...))`` drives a legacy ``Strategy`` inside a ``LegacyContext``; the sites run
``secaggplus_mod`` around a NumPyClient (clients/secagg_app.py) that calls the same
``train_round`` as the plain path. ``server_app.py`` calls :func:`run_secure_aggregation` when
``secure_aggregation.enabled``; plan, per-site records (server/strategy.py's RoundRecorder), server
ledger and checkpoints are shared.

What the server receives from each site in a round (tests/apps/test_secagg.py inspects it):
- setup / share keys: the site's two public keys, then key shares encrypted for its neighbours;
- collect: its quantized, weight-scaled encoder weights *plus* pairwise and private masks, mod
  ``modulus_range`` (the mod empties the site's ArrayRecord) — and, in the clear, the FitRes
  weight and the whitelisted scalar metrics (ε, status, loss, ...);
- unmask: for every neighbour, a share of its private-mask seed if it survived or of its mask key
  if it dropped out — never both for the same site.
The workflow unmasks the sum, divides by the (also masked) weight sum and hands every FitRes the
same weighted mean; :class:`SecAggFedSSL` never sees anything per site but the scalars.

Weighting: a site sends ``w · weights`` with ``w`` masked along. ``w`` is its example count capped
at ``secure_aggregation.max_weight`` (FedAvg), or 1 under site-level DP (uniform mean, fixed
denominator; see server/site_dp.py). A site that refuses (budget spent) sends the global weights
back with ``w = 0``: what it contributes before masking is the constant ``quantize(0)``, independent
of its data, and it keeps its place in the protocol so the round completes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log as flwr_log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedssl.config import ExperimentConfig
from fedssl.fl import keys
from fedssl.fl.plan import TrainPlan
from fedssl.fl.records import SiteReport
from server.site_dp import SiteLevelBook, fixed_denominator_mean, legacy_dp_wrapper
from server.strategy import UNREACHABLE_ERROR_CODES, RoundRecorder, round_metrics

INFO = 20
Checkpoint = Callable[[int, dict[str, torch.Tensor]], None]


class SecAggFedSSL(LegacyFedAvg):
    """Legacy strategy under SecAggPlusWorkflow: records the scalars, keeps the unmasked mean."""

    def __init__(
        self,
        *,
        names: list[str],
        recorder: RoundRecorder,
        plan: TrainPlan,
        weighting: str,
        max_weight: float,
        checkpoint: Checkpoint,
        book: SiteLevelBook | None = None,
        **kwargs,
    ) -> None:
        super().__init__(on_fit_config_fn=self._fit_config, accept_failures=True, **kwargs)
        self.names = names
        self.recorder = recorder
        self.plan = plan
        self.weighting = weighting
        self.max_weight = float(max_weight)
        self.checkpoint = checkpoint
        self.book = book
        self.latest: list[np.ndarray] | None = None
        self._current: list[np.ndarray] = []

    def __repr__(self) -> str:
        return "SecAggFedSSL"

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {
            **self.plan.with_round(server_round).to_wire(),
            keys.SECAGG_WEIGHTING: self.weighting,
            keys.SECAGG_MAX_WEIGHT: self.max_weight,
        }

    def configure_fit(self, server_round, parameters, client_manager):
        self.recorder.start_round()
        self._current = parameters_to_ndarrays(parameters)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.book is not None and not self.book.charge(server_round, len(instructions)):
            return []
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        reports: list[SiteReport] = []
        contributing = 0
        for proxy, fitres in results:
            report = self.recorder.report(server_round, proxy.node_id, fitres.metrics)
            if report is None:
                continue
            reports.append(report)
            contributing += int(report.status == keys.STATUS_TRAINED and fitres.num_examples > 0)
        errors = self.recorder.site_errors(server_round, [_failure(failure) for failure in failures])
        aggregate = self._aggregate(server_round, results, contributing)
        self.recorder.finish_round(server_round, reports)
        unreachable = sum(1 for failure in failures if _unreachable(failure))
        self.recorder.stop_if_all_failed(server_round, errors, len(results) + len(failures), unreachable)  # as on the plain path
        if aggregate is None:
            return None, {}
        return ndarrays_to_parameters(aggregate), round_metrics(reports)

    def _aggregate(self, server_round: int, results: list[tuple[object, FitRes]], contributing: int) -> list[np.ndarray] | None:
        if not contributing or not results:
            flwr_log(INFO, "fedssl: round %d: no site contributed an update; the global encoder is unchanged", server_round)
            return None
        # The workflow put the same unmasked weighted mean into every result.
        mean = parameters_to_ndarrays(results[0][1].parameters)
        if not all(np.all(np.isfinite(a)) for a in mean):
            self.recorder.failure(server_round, -1, "secure aggregate is not finite (weights or quantization range?)")
            return None
        if self.book is not None:
            # Uniform weights: the mean over the k contributing sites, i.e. an update sum of k·(mean − θ);
            # DP-FedAvg wants that sum over the fixed m sampled sites.
            update_sum = [contributing * (a.astype(np.float64) - c) for c, a in zip(self._current, mean, strict=True)]
            mean = fixed_denominator_mean(self._current, update_sum, self.book.sites_per_round)
        return [np.asarray(a, dtype=c.dtype) for a, c in zip(mean, self._current, strict=True)]

    def evaluate(self, server_round: int, parameters: Parameters):
        """Called by the workflow before round 1 and after every round: checkpoint the global encoder."""
        self.latest = parameters_to_ndarrays(parameters)
        self.checkpoint(server_round, self.state_dict(self.latest))
        return None

    def state_dict(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(arr, copy=True)) for name, arr in zip(self.names, arrays, strict=True)}


def _failure(failure: object) -> tuple[int, str]:
    if isinstance(failure, tuple) and failure:
        proxy, res = failure[0], failure[1] if len(failure) > 1 else None
        reason = getattr(getattr(res, "status", None), "message", "") or "site reported a failure"
        return int(getattr(proxy, "node_id", -1)), reason
    return -1, f"dropped out: {failure}"[:300]


def _unreachable(failure: object) -> bool:
    """Flower's SecAgg+ workflow wraps a failed reply's Error in an Exception: was it a node that did not answer?"""
    error = failure.args[0] if isinstance(failure, BaseException) and failure.args else None
    return getattr(error, "code", None) in UNREACHABLE_ERROR_CODES


def _flower_count(value: float) -> int | float:
    """Config holds both kinds as floats; Flower reads an int as a count and a float as a fraction."""
    return float(value) if value <= 1 else int(value)


def secagg_workflow(config: ExperimentConfig) -> SecAggPlusWorkflow:
    sa = config.secure_aggregation
    return SecAggPlusWorkflow(
        num_shares=_flower_count(sa.num_shares),
        reconstruction_threshold=_flower_count(sa.reconstruction_threshold),
        max_weight=1.0 if config.site_dp.enabled else float(sa.max_weight),
        clipping_range=float(sa.clipping_range),
        quantization_range=int(sa.quantization_range),
        modulus_range=int(sa.modulus_range),
        timeout=sa.timeout,
    )


def run_secure_aggregation(
    grid, context, config: ExperimentConfig, plan: TrainPlan, initial: Mapping[str, torch.Tensor],
    recorder: RoundRecorder, book: SiteLevelBook | None, checkpoint: Checkpoint,
) -> dict[str, torch.Tensor]:
    """Run all rounds under SecAgg+ (and site-level DP with a ``book``); returns the final encoder state."""
    fed = config.federation
    names = list(initial)
    strategy = SecAggFedSSL(
        names=names,
        recorder=recorder,
        plan=plan,
        weighting="uniform" if book is not None else "examples",
        max_weight=1.0 if book is not None else config.secure_aggregation.max_weight,
        checkpoint=checkpoint,
        book=book,
        fraction_fit=fed.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=fed.min_sites,
        min_evaluate_clients=fed.min_sites,
        min_available_clients=fed.min_sites,
        initial_parameters=ndarrays_to_parameters([t.detach().cpu().numpy() for t in initial.values()]),
    )
    top = legacy_dp_wrapper(strategy, book) if book is not None else strategy
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds), strategy=top)
    DefaultWorkflow(fit_workflow=secagg_workflow(config))(grid, legacy)
    if strategy.latest is None:
        return {name: t.detach().cpu().clone() for name, t in initial.items()}
    return strategy.state_dict(strategy.latest)
