"""Flower ClientApp: unpack the plan, run one local round, guard egress, reply.

Thin on purpose: all training and privacy logic lives in fedssl (Flower-free). SecAgg+ protocol
messages go to the legacy app in clients/secagg_app.py, which calls the same train_round.

torch, Opacus and scikit-learn load on the first message, not when this module is imported: the
Simulation Engine imports it once in the flwr-simulation process only to check that it loads, and
starts Ray after that check, so heavy imports here would delay every site's first round by their
import time (benchmarks/README.md, section 2).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.site_dp_mods import site_update_clipping_mod
from fedssl.fl import keys
from fedssl.phases import mark

if TYPE_CHECKING:  # bound at the first message by _load_training_modules()
    from clients.secagg_app import app as secagg_app
    from clients.secagg_app import is_secagg_message
    from fedssl.fl.egress import check_egress
    from fedssl.fl.site_reply import site_reply_records
    from fedssl.models import build_encoder, encoder_state_keys
    from fedssl.sites import resolve_site
    from fedssl.training.local import STATUS_TRAINED, train_round
    from fedssl.training.plan import TrainPlan

# name in this module -> (module, attribute)
_DEFERRED = {
    "secagg_app": ("clients.secagg_app", "app"),
    "is_secagg_message": ("clients.secagg_app", "is_secagg_message"),
    "check_egress": ("fedssl.fl.egress", "check_egress"),
    "site_reply_records": ("fedssl.fl.site_reply", "site_reply_records"),
    "build_encoder": ("fedssl.models", "build_encoder"),
    "encoder_state_keys": ("fedssl.models", "encoder_state_keys"),
    "resolve_site": ("fedssl.sites", "resolve_site"),
    "STATUS_TRAINED": ("fedssl.training.local", "STATUS_TRAINED"),
    "train_round": ("fedssl.training.local", "train_round"),
    "TrainPlan": ("fedssl.training.plan", "TrainPlan"),
}


def _load_training_modules() -> None:
    """Bind the deferred names as ordinary module globals (once; a name already set is kept)."""
    namespace = globals()
    if all(name in namespace for name in _DEFERRED):
        return
    mark("client_modules_loading")
    for name, (module, attribute) in _DEFERRED.items():
        if name not in namespace:
            namespace[name] = getattr(importlib.import_module(module), attribute)
    mark("client_modules_loaded")


def __getattr__(name: str):  # PEP 562: `clients.client_app.train_round` etc. still work from outside
    if name in _DEFERRED:
        _load_training_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


app = ClientApp()


@app.train(mods=[site_update_clipping_mod])  # a no-op unless the server asks for site-level DP clipping
def train(msg: Message, context: Context) -> Message:
    _load_training_modules()
    if is_secagg_message(msg):
        return secagg_app(msg, context)
    mark("site_start")
    dataset, site = resolve_site(context.node_config, context.run_config)
    plan = TrainPlan.from_wire(dict(msg.content[keys.CONFIG]))
    global_encoder = msg.content[keys.ARRAYS].to_torch_state_dict()
    result = train_round(dataset, global_encoder, plan, site)
    mark("site_done", site=site.site_id, round=plan.server_round, train_s=result.train_seconds)
    records = site_reply_records(result, site.site_id, site.privacy.enabled)
    expected = encoder_state_keys(build_encoder(plan.encoder, dataset.input_shape, width=plan.width, depth=plan.depth))
    check_egress(records, expected, arrays_required=result.status == STATUS_TRAINED)
    return Message(content=RecordDict(records), reply_to=msg)
