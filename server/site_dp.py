"""Site-level (central) DP on the server: Flower's fixed-clipping DP wrappers around fedssl's strategies.

Flower's wrappers clip (server side) or ask the sites to clip (client side, ``fixedclipping_mod``)
each site's update to ``C`` and add Gaussian noise of std ``σ·C/m`` to the aggregate, ``m`` being the
sites sampled per round. That noise gives multiplier ``σ`` only if one site moves the aggregate
by at most ``C/m``, so the inner strategy here averages *uniformly* over a *fixed* denominator:

    θ_new = θ + (1/m) · Σ_{sites that trained} (θ_i − θ)

(an example-weighted mean would let a large site move it by up to ``C``; a site that refuses or
drops out contributes a zero update). The site-level accountant (:mod:`fedssl.privacy.site_level`)
is charged for a round when it is configured — before anything is released — and the run stops
releasing when ``site_dp.target_epsilon`` would be exceeded. Flower's own accountant option is
not used: it requires an unmodified ``FedAvg.aggregate_train`` and no sampling amplification.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log as flwr_log
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping

from fedssl.config import ExperimentConfig
from fedssl.errors import BudgetExhaustedError
from fedssl.fl import keys
from fedssl.layout import RunDir
from fedssl.privacy.site_level import SiteLevelAccountant, mechanism_from_config
from server.strategy import FedSSLAvg, RoundRecorder, strategy_class, strategy_options

ERROR = logging.ERROR
INFO = logging.INFO


class SiteLevelBook:
    """The run's site-level accountant, charged once per round before the release (both paths)."""

    def __init__(self, config: ExperimentConfig, run_dir: Path) -> None:
        mechanism = mechanism_from_config(config.site_dp, config.federation)
        self.accountant = SiteLevelAccountant(mechanism, config.site_dp.target_epsilon, path=RunDir(run_dir).site_level_state)
        self.mechanism = mechanism
        self._epsilon: dict[int, float] = {}
        flwr_log(INFO, "fedssl: site-level DP: %s; %.3g spent so far", mechanism.describe(), self.accountant.epsilon)

    @property
    def sites_per_round(self) -> int:
        return self.mechanism.sample_size

    def charge(self, server_round: int, sampled: int) -> bool:
        """True if the round may be released (and is now charged); False to skip it."""
        if sampled != self.mechanism.sample_size:
            flwr_log(ERROR, "fedssl: round %d: %d sites sampled, site-level accounting assumes %d; round skipped",
                     server_round, sampled, self.mechanism.sample_size)
            return False
        try:
            self._epsilon[server_round] = self.accountant.charge(server_round)
        except BudgetExhaustedError as err:
            flwr_log(ERROR, "fedssl: round %d skipped: %s", server_round, err)
            return False
        flwr_log(INFO, "fedssl: round %d: site-level eps %.3f after this release (delta=%g)",
                 server_round, self._epsilon[server_round], self.mechanism.delta)
        return True

    def fields(self, server_round: int) -> dict:
        return self.accountant.ledger_fields(self._epsilon.get(server_round))


def summed_updates(current: Sequence[np.ndarray], updated: Iterable[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Σ_i (θ_i − θ) over the sites' updated weights, in float64."""
    total = [np.zeros_like(np.asarray(c), dtype=np.float64) for c in current]
    for arrays in updated:
        for acc, new, old in zip(total, arrays, current, strict=True):
            acc += np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    return total


def fixed_denominator_mean(current: Sequence[np.ndarray], update_sum: Sequence[np.ndarray], sites_per_round: int) -> list[np.ndarray]:
    """θ + (1/m)·Σ_i(θ_i − θ): the uniform, fixed-denominator mean DP-FedAvg's noise is calibrated to.

    ``update_sum`` is Σ_i(θ_i − θ) over the sites that contributed; a sampled site that refused or
    dropped out counts as a zero update. Both paths use it: the plain path sums the sites' updates
    (:func:`summed_updates`), the SecAgg+ path has only the unmasked mean of its k contributors.
    """
    return [
        (np.asarray(c, dtype=np.float64) + np.asarray(s, dtype=np.float64) / sites_per_round).astype(np.asarray(c).dtype)
        for c, s in zip(current, update_sum, strict=True)
    ]


class SiteDPAvg(FedSSLAvg):
    """FedSSLAvg for site-level DP (Message API path): uniform fixed-denominator mean, accountant charged per round."""

    def __init__(self, *, book: SiteLevelBook, **kwargs) -> None:
        super().__init__(**kwargs)
        self.book = book
        self._current: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self._current = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        return messages if self.book.charge(server_round, len(messages)) else []

    def average(self, server_round: int, trained: list[Message]) -> ArrayRecord | None:
        assert self._current is not None
        names = list(self._current.keys())
        current = [self._current[name].numpy() for name in names]
        updated = [[msg.content[keys.ARRAYS][name].numpy() for name in names] for msg in trained]
        mean = fixed_denominator_mean(current, summed_updates(current, updated), self.book.sites_per_round)
        return ArrayRecord({name: Array(arr) for name, arr in zip(names, mean)})


class GuardedServerSideClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side clipping, after dropping malformed arrays: it computes on every reply's arrays before
    the inner strategy validates them, and one broadcastable or missing array would raise there and abort the run."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_train(server_round, self.strategy.without_bad_arrays(server_round, list(replies)))


def message_strategy(config: ExperimentConfig, book: SiteLevelBook | None, *, recorder: RoundRecorder, **kwargs):
    """The plain (Message API) path's strategy: federation.strategy's (FedSSLAvg, FedSSLMedian, FedSSLTrimmedAvg),
    or (with a site-level ``book``) Flower's DP wrapper around SiteDPAvg."""
    kwargs = {**strategy_options(config.federation), **kwargs}
    if book is None:
        return strategy_class(config.federation.strategy)(recorder=recorder, **kwargs)
    inner = SiteDPAvg(book=book, recorder=recorder, **kwargs)
    wrapper = DifferentialPrivacyClientSideFixedClipping if config.site_dp.side == "client" else GuardedServerSideClipping
    return wrapper(inner, book.mechanism.noise_multiplier, book.mechanism.clipping_norm, book.sites_per_round)


def legacy_dp_wrapper(inner, book: SiteLevelBook):
    """The SecAgg+ (legacy) path: sites clip with ``fixedclipping_mod``; the server noises the unmasked sum."""
    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping

    return DifferentialPrivacyClientSideFixedClipping(inner, book.mechanism.noise_multiplier, book.mechanism.clipping_norm,
                                                      book.sites_per_round)
