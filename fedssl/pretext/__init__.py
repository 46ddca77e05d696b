"""Self-supervised pretext tasks: one file per method, looked up by name.

``get_pretext(name, params).build_model(encoder)`` gives the module local training runs (and
Opacus wraps); its ``forward`` returns one loss per sample. Methods whose loss couples samples
(SimCLR) are refused under DP by ``require_dp_compatible``.
"""

# Importing each method module registers it.
from fedssl.pretext import (  # noqa: F401
    byol, jigsaw, masked_reconstruction, masked_segment, masked_tokens, moco, rotation, rotation_jigsaw, scarf, simclr,
    simsiam, ts_views, vime,
)
from fedssl.pretext.base import PretextModel, PretextTask
from fedssl.pretext.registry import PRETEXT_TASKS, check_config, get_pretext, register_pretext, require_dp_compatible

__all__ = ["PRETEXT_TASKS", "PretextModel", "PretextTask", "check_config", "get_pretext", "register_pretext", "require_dp_compatible"]
