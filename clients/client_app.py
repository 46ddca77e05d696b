"""Flower ClientApp: hand each training request to the site's round, reply with what it allows out.

Thin on purpose: resolving the site, the plan, training, the reply and the egress guard are
fedssl.site_round's, shared with the SecAgg+ path (clients/secagg_app.py), to which SecAgg+
protocol messages are handed.

The training stack (torch, Opacus, scikit-learn) loads on the first message, not when this module
is imported: the Simulation Engine imports it once in the flwr-simulation process only to check
that it loads, and starts Ray after that check, so heavy imports here would delay every site's
first round by their import time (benchmarks/README.md, section 2).
"""

from __future__ import annotations

import importlib
import sys

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.site_dp_mods import site_update_clipping_mod
from fedssl.errors import FedSSLError
from fedssl.fl import keys
from fedssl.phases import mark
from fedssl.run.stock import launch_run_config

SITE_ROUND_MODULE = "fedssl.site_round"

app = ClientApp()


def _site_round_module():
    """fedssl.site_round, imported on the first message; the marks let the overhead benchmark time it."""
    if SITE_ROUND_MODULE not in sys.modules:
        mark("client_modules_loading")
        importlib.import_module(SITE_ROUND_MODULE)
        mark("client_modules_loaded")
    return sys.modules[SITE_ROUND_MODULE]


def _name_the_site(err: FedSSLError, node_config) -> None:
    """Prefix a simulated site's one-line error with its site id: the server sees a failed reply's node id only.

    The message is changed in place (not re-raised as another type): callers and Flower see the same exception.
    """
    if keys.NODE_PARTITION_ID in node_config and len(err.args) == 1:
        err.args = (f"site {int(node_config[keys.NODE_PARTITION_ID])}: {err.args[0]}",)


@app.train(mods=[site_update_clipping_mod])  # a no-op unless the server asks for site-level DP clipping
def train(msg: Message, context: Context) -> Message:
    # The training stack first, between its marks: clients.secagg_app imports it too, and importing that first
    # left the marks unwritten (federation_overhead's worker phases read null on 2026-12-07).
    site_round = _site_round_module()
    from clients.secagg_app import app as secagg_app
    from clients.secagg_app import is_secagg_message

    if is_secagg_message(msg):
        return secagg_app(msg, context)
    mark("site_start")
    try:
        reply = site_round.run_site_round(
            context.node_config, launch_run_config(context), msg.content[keys.CONFIG], msg.content[keys.ARRAYS].to_torch_state_dict()
        )
    except FedSSLError as err:
        _name_the_site(err, context.node_config)
        raise

    mark("site_done", site=reply.site.site_id, round=reply.plan.server_round, train_s=reply.result.train_seconds)
    return Message(content=RecordDict(reply.records), reply_to=msg)
