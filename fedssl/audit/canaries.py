"""Gradient canaries for the empirical privacy audit.

Nasr, Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini & Terzis, "Tight Auditing of
Differentially Private Machine Learning", USENIX Security 2023, https://arxiv.org/abs/2302.07956:
the strongest white-box audit of DP-SGD gives each canary a *Dirac* gradient — all of it on
one model weight that no other canary uses. An observer who sees every round's update reads
that weight's movement: a member moves it by (its clipped gradient) × lr / B each time it is
sampled, a non-member not at all. Only the data's own gradients and the DP noise blur it, so
without DP members stand out completely, and with DP the reading is exactly as noisy as the
mechanism claims.

Input images carry no such gradient through a small weight-shared CNN (every random pattern
pushes the same few directions), so the canary rows' *loss* is crafted instead. A canary is
still a row of the site's data set that goes through the real pipeline — Poisson sampling,
the per-sample clipping engine, Opacus' noise, the persistent accountant and ledger — only its
per-sample loss is ``scale · layer(z)[o, centre]``, with ``z`` a one-hot input of value
``DIRAC_INPUT`` at one (channel, kernel row, kernel column): the gradient is ``scale ·
DIRAC_INPUT`` on weight ``W[o, c, a, b]`` plus ``scale`` on bias ``b[o]``. DP's guarantee
holds for any per-sample loss, so a crafted one audits the same mechanism.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedssl.errors import ConfigError

# The one-hot input's value: the weight carries DIRAC_INPUT² / (DIRAC_INPUT² + 1) = 99 % of the
# canary's squared gradient norm, the shared bias term the rest.
DIRAC_INPUT = 10.0
# Canary gradient norm over the clipping norm: > 1, so DP-SGD clips every canary to exactly C
# (the worst case its analysis covers); without DP the canary pushes with 2C.
OVERSHOOT = 2.0


def audited_layer(encoder: nn.Module) -> tuple[str, nn.Module]:
    """The encoder's largest Conv2d/Linear weight (the last one on ties): most coordinates,
    so the canaries' weights are the ones the real data move least each."""
    candidates = [(name, m) for name, m in encoder.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not candidates:
        raise ConfigError("empirical audit: the encoder has no Conv2d or Linear layer to place gradient canaries in")
    name, layer = max(reversed(candidates), key=lambda item: item[1].weight.numel())
    if isinstance(layer, nn.Conv2d) and (layer.stride != (1, 1) or layer.dilation != (1, 1) or layer.groups != 1):
        raise ConfigError(f"empirical audit: layer {name!r} is strided, dilated or grouped; gradient canaries need a plain conv")
    return name, layer


class GradientCanaries:
    """Which rows of a batch are canaries, and the weight coordinate each one pushes."""

    def __init__(self, inputs: torch.Tensor, encoder: nn.Module, max_grad_norm: float, seed: int) -> None:
        self.inputs = inputs
        self.layer_name, layer = audited_layer(encoder)
        if len(inputs) > layer.weight.numel():
            raise ConfigError(f"--canaries: at most {layer.weight.numel()} canaries fit layer {self.layer_name!r}, got {len(inputs)}")
        rng = np.random.default_rng(seed)
        flat = rng.choice(layer.weight.numel(), size=len(inputs), replace=False)
        self.coordinates = torch.as_tensor(np.stack(np.unravel_index(flat, layer.weight.shape), axis=1))
        self.flat_coordinates = torch.as_tensor(flat)
        self.scale = OVERSHOOT * max_grad_norm / float(np.hypot(DIRAC_INPUT, 1.0))

    def weight_key(self) -> str:
        """The encoder state-dict key whose coordinates the canaries push."""
        return f"{self.layer_name}.weight"

    def readout(self, encoder_state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each canary's weight, in canary order."""
        return encoder_state[self.weight_key()].reshape(-1)[self.flat_coordinates].double()

    def wrap(self, model: nn.Module) -> nn.Module:
        return _CanaryLoss(model, self)

    def row_index(self, x: torch.Tensor) -> torch.Tensor:
        """Canary number of each row of ``x``, or -1 for real data."""
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        same = (x.flatten(1)[:, None, :] == self.inputs.to(x.device).flatten(1)[None, :, :]).all(dim=2)
        return torch.where(same.any(dim=1), same.float().argmax(dim=1), torch.full_like(same[:, 0], -1, dtype=torch.long))

    def dirac_loss(self, layer: nn.Module, index: torch.Tensor) -> torch.Tensor:
        """Per-row crafted loss; rows with index -1 get a zero input (and are masked by the caller)."""
        batch = index.shape[0]
        coords = self.coordinates.to(index.device)[index.clamp_min(0)]
        rows = torch.arange(batch, device=index.device)
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            z = torch.zeros(batch, layer.in_channels, kh, kw, device=index.device)
            z[rows, coords[:, 1], coords[:, 2], coords[:, 3]] = DIRAC_INPUT
            # With stride 1 the output at (padding_h, padding_w) sees exactly the kh x kw input.
            pad_h, pad_w = layer.padding if not isinstance(layer.padding, str) else (
                (kh // 2, kw // 2) if layer.padding == "same" else (0, 0))
            out = layer(z)[:, :, pad_h, pad_w]
        else:
            z = torch.zeros(batch, layer.in_features, device=index.device)
            z[rows, coords[:, 1]] = DIRAC_INPUT
            out = layer(z)
        return self.scale * out[rows, coords[:, 0]]


class _CanaryLoss(nn.Module):
    """The site's pretext model with each canary row's loss replaced by its Dirac term.

    The layer is called on the whole batch (zeros for real rows, whose Dirac term is masked
    out), so every module call keeps the batch axis as the sample axis, as per-sample
    clipping needs. The wrapper adds no parameters: the optimizer and the clipping engine see
    exactly the site's model.
    """

    def __init__(self, model: nn.Module, canaries: GradientCanaries) -> None:
        super().__init__()
        self.model = model
        self.canaries = canaries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        losses = self.model(x)
        index = self.canaries.row_index(x)
        if not bool((index >= 0).any()):
            return losses
        layer = self.model.encoder.get_submodule(self.canaries.layer_name)
        return torch.where(index >= 0, self.canaries.dirac_loss(layer, index), losses)
