"""Client-side clipping for site-level DP: Flower's ``fixedclipping_mod``, applied only when asked.

The server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper puts the clipping norm into the
train config; Flower's mod then clips the site's update (its weights minus the global ones) to that
L2 norm before anything leaves. Two gaps are closed here, nothing else is changed:
- without site-level DP there is no clipping norm and Flower's mod would fail: pass through;
- a site that refused to train (budget spent) has no update to clip (Message API: no arrays, which
  Flower's mod reports as an error; legacy: a zero update, whose norm Flower divides by): its reply
  goes out unchanged.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import fixedclipping_mod as legacy_fixedclipping_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedssl.fl import keys

FITINS_CONFIG = "fitins.config"
FITRES_WEIGHT = "fitres.num_examples"


def _clip_unless_refused(flower_mod, msg: Message, ctxt: Context, call_next, refused) -> Message:
    reply = call_next(msg, ctxt)  # train once; Flower's mod then clips this very reply
    if reply.has_error() or refused(reply):
        return reply
    return flower_mod(msg, ctxt, lambda _msg, _ctxt: reply)


def site_update_clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Message API path (clients/client_app.py)."""
    config = msg.content.config_records.get(keys.CONFIG) if msg.has_content() else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    return _clip_unless_refused(fixedclipping_mod, msg, ctxt, call_next, lambda reply: keys.ARRAYS not in reply.content.array_records)


def legacy_site_update_clipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """SecAgg+ path (clients/secagg_app.py), inside secaggplus_mod so the clipped update is what gets masked."""
    config = msg.content.config_records.get(FITINS_CONFIG) if msg.has_content() else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)

    def refused(reply: Message) -> bool:
        weight = reply.content.metric_records.get(FITRES_WEIGHT)
        return weight is not None and int(weight["num_examples"]) == 0

    return _clip_unless_refused(legacy_fixedclipping_mod, msg, ctxt, call_next, refused)
