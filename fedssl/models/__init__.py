"""Encoders shared by the sites and the coordinator.

One factory builds every encoder so that the server's initial weights and each site's
model have identical parameter names and shapes. All encoders use GroupNorm or
LayerNorm, never BatchNorm: BatchNorm mixes samples within a batch, which breaks
per-sample gradients and so DP-SGD (Opacus rejects it).
"""

from fedssl.models.encoders import Encoder
from fedssl.models.registry import ENCODERS, IMAGE_ENCODERS, build_encoder, encoder_for, encoder_state_keys

__all__ = ["ENCODERS", "IMAGE_ENCODERS", "Encoder", "build_encoder", "encoder_for", "encoder_state_keys"]
