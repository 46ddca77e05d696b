"""Flower ClientApp: unpack the plan, run one local round, guard egress, reply.

Thin on purpose: all training and privacy logic lives in fedssl (Flower-free). SecAgg+ protocol
messages go to the legacy app in clients/secagg_app.py, which calls the same train_round.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.secagg_app import app as secagg_app
from clients.secagg_app import is_secagg_message
from clients.site_dp_mods import site_update_clipping_mod
from fedssl.fl import keys
from fedssl.fl.egress import check_egress
from fedssl.fl.site_reply import site_reply_records
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.sites import resolve_site
from fedssl.training.local import STATUS_TRAINED, train_round
from fedssl.training.plan import TrainPlan

app = ClientApp()


@app.train(mods=[site_update_clipping_mod])  # a no-op unless the server asks for site-level DP clipping
def train(msg: Message, context: Context) -> Message:
    if is_secagg_message(msg):
        return secagg_app(msg, context)
    dataset, site = resolve_site(context.node_config, context.run_config)
    plan = TrainPlan.from_wire(dict(msg.content[keys.CONFIG]))
    global_encoder = msg.content[keys.ARRAYS].to_torch_state_dict()
    result = train_round(dataset, global_encoder, plan, site)
    records = site_reply_records(result, site.site_id, site.privacy.enabled)
    expected = encoder_state_keys(build_encoder(plan.encoder, dataset.input_shape, width=plan.width, depth=plan.depth))
    check_egress(records, expected, arrays_required=result.status == STATUS_TRAINED)
    return Message(content=RecordDict(records), reply_to=msg)
