"""The site's side of Flower's SecAgg+ (legacy path): a NumPyClient around the same ``train_round``.

Flower 1.42 has SecAgg+ only on the legacy path: ``ClientApp(client_fn=..., mods=[secaggplus_mod])``.
A ClientApp is either legacy (``client_fn``) or decorated (``@app.train()``), never both, and the
SecAgg+ workflow's messages are ordinary ``train`` messages. So clients/client_app.py stays the
one component Flower loads, and its train handler hands SecAgg+ protocol messages (they carry the
``secaggplus_configs`` record) to :data:`app` here. Training, budget charge, ledger and egress
guard are exactly the plain path's: both call fedssl.site_round.run_site_round.

What leaves the site (see server/secagg_app.py for the server's view): the encoder weights, scaled
by the site's weight and masked by ``secaggplus_mod``; the weight itself (in the clear, as FitRes
``num_examples``, and masked inside the vector: under DP the plan's data-independent weight, as in
the metrics); the whitelisted scalar metrics, in the clear.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from clients.site_dp_mods import legacy_site_update_clipping_mod
from fedssl.errors import ConfigError
from fedssl.fl import keys
from fedssl.run.stock import launch_run_config
from fedssl.site_round import run_site_round

log = logging.getLogger(__name__)


def is_secagg_message(msg: Message) -> bool:
    """A message of the SecAgg+ protocol (any of its four stages)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_weight(metrics: Mapping[str, int | float], weighting: str, max_weight: float) -> int:
    """The FedAvg weight SecAgg+ multiplies into the masked update: 0 for a refused site.

    Taken from the site's released (egress-checked) metrics, never from its RoundResult: the
    weight also travels in the clear, so under DP it must be the data-independent released one."""
    if int(metrics[keys.STATUS]) != keys.STATUS_CODES[keys.STATUS_TRAINED]:
        return 0
    if weighting == "uniform":
        return 1
    if weighting != "examples":
        raise ConfigError(f"train config: {keys.SECAGG_WEIGHTING}={weighting!r}; expected one of {keys.SECAGG_WEIGHTINGS}")
    examples = int(metrics[keys.NUM_EXAMPLES])
    if examples > max_weight:
        log.warning("site weight %d capped at secure_aggregation.max_weight=%g", examples, max_weight)
    return int(min(examples, int(max_weight)))


def site_fit(parameters: Sequence[np.ndarray], config: Mapping[str, object], context: Context) -> tuple[list[np.ndarray], int, dict]:
    """One SecAgg+ round at this site: (weights to mask, weight, whitelisted metrics)."""
    reply = run_site_round(context.node_config, launch_run_config(context), config, parameters)
    metrics = dict(reply.records[keys.METRICS].items())
    weight = secagg_weight(metrics, str(config.get(keys.SECAGG_WEIGHTING, "examples")),
                           float(config.get(keys.SECAGG_MAX_WEIGHT, 1000.0)))
    if weight == 0:
        # Refused: hand back the global weights with weight 0. SecAgg+ multiplies them by 0 before
        # quantizing, so the site's share of the sum is a data-independent constant plus masks.
        return [np.array(p, copy=True) for p in parameters], 0, metrics
    arrays = reply.records[keys.ARRAYS]
    return [arrays[name].numpy() for name in reply.encoder_shapes], weight, metrics


class SecAggSite(NumPyClient):
    def __init__(self, context: Context) -> None:
        self._context = context

    def fit(self, parameters, config):
        return site_fit(parameters, config, self._context)


def client_fn(context: Context):
    return SecAggSite(context).to_client()


# secaggplus_mod is outermost: it masks whatever the inner mods and the client produce. The
# clipping mod is a no-op unless the server runs site-level DP (client-side clipping).
app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod, legacy_site_update_clipping_mod])
