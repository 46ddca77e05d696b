"""Can DP-SGD train this encoder? Opacus' validators, per layer, before any site is contacted.

A model Opacus cannot make private (BatchNorm mixes the samples of a batch; stock LSTM/GRU/attention
modules hide their parameters from per-sample hooks) is refused in one line that lists each offending
layer by name with its fix. Used by the run pipeline on the coordinator; the ServerApp never imports
this (nor Opacus), and each site's clipping engine refuses such a model again on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from fedssl.errors import ConfigError
from fedssl.models.custom import is_custom_spec
from fedssl.models.registry import build_encoder

# What to use instead, for the module types Opacus' validators refuse.
FIXES: dict[str, str] = {
    "BatchNorm1d": "use nn.GroupNorm (opacus.validators.ModuleValidator.fix replaces it)",
    "BatchNorm2d": "use nn.GroupNorm (opacus.validators.ModuleValidator.fix replaces it)",
    "BatchNorm3d": "use nn.GroupNorm (opacus.validators.ModuleValidator.fix replaces it)",
    "SyncBatchNorm": "use nn.GroupNorm",
    "LSTM": "use opacus.layers.DPLSTM (same arguments)",
    "GRU": "use opacus.layers.DPGRU (same arguments)",
    "RNN": "use opacus.layers.DPRNN (same arguments)",
    "MultiheadAttention": "use opacus.layers.DPMultiheadAttention (same arguments)",
    "InstanceNorm1d": "set track_running_stats=False, or use nn.GroupNorm",
    "InstanceNorm2d": "set track_running_stats=False, or use nn.GroupNorm",
    "InstanceNorm3d": "set track_running_stats=False, or use nn.GroupNorm",
}



def opacus_problems(model: nn.Module) -> list[str]:
    """One ``layer name (type): fix`` per trainable layer that Opacus' validators refuse."""
    problems = []
    for name, layer in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        if validator is not None and validator(layer):
            kind = type(layer).__name__
            problems.append(f"{name or '<root>'} ({kind}): {FIXES.get(kind, 'replace it with a layer Opacus supports')}")
    return problems



def check_encoder(kind: str, input_shape: Sequence[int], width: int, depth: int) -> None:
    """Build a brought-your-own encoder once at the edge: unimportable, mis-shaped or not private is one
    line before any site is contacted (built-in encoders are checked by the config and their tests)."""
    if not (is_custom_spec(kind) and input_shape):
        return
    model = build_encoder(kind, input_shape, width=width, depth=depth, seed=0)
    problems = opacus_problems(model)
    if problems:
        raise ConfigError(f"model.encoder: {kind} cannot be trained with DP-SGD: {'; '.join(problems)}")
