"""A site's side of one federated round, from the server's request to the egress-checked reply.

Both Flower paths call :func:`run_site_round`: the plain ClientApp (clients/client_app.py) and the
SecAgg+ client (clients/secagg_app.py), so resolving the site, reading the plan, training, building
the reply and the egress guard are written once. Flower-free: the apps unpack Flower's messages
into plain mappings and pack the returned records into their own replies.

Which site a process is comes from Flower's node config: in simulation ``partition-id`` (with the
resolved experiment and run dir in the run config); in a deployment ``site-config``, the path of
the operator's own site.yaml — the server can neither pick another file nor change its budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedssl.data.dataset import SiteDataset
from fedssl.errors import ConfigError
from fedssl.fl.egress import check_egress
from fedssl.fl.keys import NODE_PARTITION_ID, NODE_SITE_CONFIG, RUN_CONFIG_PATH, RUN_DIR, STATUS_TRAINED
from fedssl.fl.plan import TrainPlan
from fedssl.fl.records import RoundResult
from fedssl.fl.site_reply import released_num_examples, site_reply_records
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.phases import mark
from fedssl.training import fedema
from fedssl.training.local import SiteSettings, train_round

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteRoundReply:
    """What may leave the site (``records``, already egress-checked) and what stays (``result``)."""

    records: dict[str, object]
    result: RoundResult
    site: SiteSettings
    plan: TrainPlan
    encoder_shapes: dict[str, tuple[int, ...]]


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[SiteDataset, SiteSettings]:
    """This process's site: its data and settings, from the node config (and, in simulation, the run config)."""
    if NODE_SITE_CONFIG in node_config:
        from fedssl.deploy.site.config import deployed_site

        return deployed_site(str(node_config[NODE_SITE_CONFIG]))
    if NODE_PARTITION_ID in node_config:
        from fedssl.experiment import simulated_site

        config_path, run_dir = run_config.get(RUN_CONFIG_PATH), run_config.get(RUN_DIR)
        if not config_path or not run_dir:
            raise ConfigError("run config: config-path and run-dir must be set; start simulations with `fedssl simulate`")
        return simulated_site(str(config_path), str(run_dir), int(node_config[NODE_PARTITION_ID]))
    raise ConfigError(f"node config: set {NODE_SITE_CONFIG}=<path to site.yaml> (deployment) or run under the simulation engine")


def run_site_round(
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    plan_config: Mapping[str, Any],
    global_encoder: Mapping[str, torch.Tensor] | Sequence[np.ndarray],
) -> SiteRoundReply:
    """One round at this site: ``global_encoder`` is a state dict (Message API) or the encoder's
    arrays in state-dict order (SecAgg+'s NumPy path); either must match this site's encoder."""
    dataset, site = resolve_site(node_config, run_config)
    plan = TrainPlan.from_wire(dict(plan_config))
    if NODE_SITE_CONFIG not in node_config:  # a simulated site: simulation.dropout may fail it, before anything is charged
        from fedssl.experiment import check_simulated_dropout

        check_simulated_dropout(str(run_config[RUN_CONFIG_PATH]), site.site_id, plan.server_round)
    shapes = encoder_state_keys(build_encoder(plan.encoder, dataset.input_shape, width=plan.width, depth=plan.depth))
    state, fedema_scale = fedema.start_weights(_as_state_dict(global_encoder, shapes), site.state_dir, plan)
    result = train_round(dataset, state, plan, site)
    if result.status == STATUS_TRAINED:
        fedema.remember(result.encoder_state, site.state_dir, plan, fedema_scale)
    dp = site.privacy.enabled
    records = site_reply_records(result, site.site_id, dp, plan)
    # The guard's DP weight comes from the plan, not from the reply: a data-dependent count is refused.
    dp_weight = released_num_examples(result, plan, dp) if dp else None
    check_egress(records, shapes, arrays_required=result.status == STATUS_TRAINED, dp_num_examples=dp_weight)
    # What a DP site does not release is still its operator's to see, in the site's own log.
    log.info("site %d, round %d: %s, %d examples, pretext loss %.4f, %.2f s", site.site_id, plan.server_round,
             result.status, result.num_examples, result.pretext_loss, result.train_seconds)
    mark("site_reply_ready")  # trained, charged, checked: what a crash while sending loses
    return SiteRoundReply(records=records, result=result, site=site, plan=plan, encoder_shapes=shapes)


def _as_state_dict(
    arrays: Mapping[str, torch.Tensor] | Sequence[np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The server's encoder as this site's state dict; one line naming the mismatch otherwise."""
    names = list(shapes)
    if isinstance(arrays, Mapping):
        got = {name: tuple(value.shape) for name, value in arrays.items()}
        if got != {name: tuple(shape) for name, shape in shapes.items()}:
            raise ConfigError(f"train request: the server sent arrays {got}; this site's encoder has {dict(shapes)}")
        return dict(arrays)
    got_list = [tuple(np.shape(a)) for a in arrays]
    if got_list != [tuple(shapes[n]) for n in names]:
        raise ConfigError(f"train config: the server sent arrays of shapes {got_list}; this site's encoder has {list(shapes.values())}")
    return {name: torch.from_numpy(np.array(arr, copy=True)) for name, arr in zip(names, arrays)}
