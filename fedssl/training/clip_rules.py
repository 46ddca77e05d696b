"""Book-keeping clipping's per-layer rules: each trainable layer's per-sample gradient norms and clipped sum.

The engine (fedssl.training.bookkeeping) keeps, per call of each trainable layer, its input
activation and the gradient of the loss with respect to its output; a rule turns those into
(squared per-sample norm of the layer's parameters, shape ``(B,)``; ``finish(c)`` giving
``{param: sum_i c_i * g_i}``). Conv2d: a batched matmul of output gradients with unfolded inputs
(the FLOPs of the ordinary weight gradient); Conv1d: the same rule, on the series as a 1 x L image;
GroupNorm / LayerNorm / bias: small per-channel sums;
Embedding: each sample's output gradients scattered onto the rows it looked up;
2-D Linear inputs: ghost norms (Li et al. 2022) that never materialise ``B x out x in``.
Only layers with a rule may hold trainable parameters (:data:`SUPPORTED`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

@dataclass
class Call:
    """One call of a trainable layer: its input, and (after backward) its output gradient."""

    activation: torch.Tensor
    grad: torch.Tensor | None = None


Finish = Callable[[torch.Tensor], dict[nn.Parameter, torch.Tensor]]


@dataclass
class _Materialised:
    """Per-sample gradients kept as tensors ``(B, *p.shape)``; the clipped sum is one GEMV."""

    grads: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)

    def add(self, param: nn.Parameter | None, per_sample: torch.Tensor, trainable: set) -> None:
        if param is None or param not in trainable:
            return
        if param in self.grads:
            self.grads[param] += per_sample
        else:
            self.grads[param] = per_sample

    def norm_sq(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(batch, dtype=like.dtype, device=like.device)
        for g in self.grads.values():
            total += torch.linalg.vector_norm(g.reshape(batch, -1), dim=1).square()
        return total

    def finish(self, c: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: (c @ g.reshape(len(c), -1)).view_as(p) for p, g in self.grads.items()}


class Buffers:
    """Work tensors reused across steps, sized for the largest batch seen (Poisson batch
    sizes vary). Fresh multi-megabyte allocations cost page faults on every step; on 8x8
    convolutions that was as slow as the per-sample matmul itself."""

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, batch: int, shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        full_key = (*key, shape, like.dtype, like.device)
        buf = self._store.get(full_key)
        if buf is None or buf.shape[0] < batch:
            buf = (torch.zeros if zero else torch.empty)((batch, *shape), dtype=like.dtype, device=like.device)
            self._store[full_key] = buf
        return buf[:batch]


def _conv2d_unfold(module: nn.Conv2d, x: torch.Tensor, buffers: Buffers) -> torch.Tensor:
    """im2col of ``x`` for ``module``: (B, Cin * kh * kw, Ho * Wo), written into a reused buffer."""
    batch, channels, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    if module.padding_mode != "zeros":
        padded = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    elif isinstance(module.padding, str):
        if module.padding == "valid":
            padded = x
        else:  # "same": torch puts the extra pixel of an odd total padding on the right / bottom
            th, tw = dh * (kh - 1), dw * (kw - 1)
            padded = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    else:
        ph, pw = module.padding
        if ph == pw == 0:
            padded = x.contiguous()
        else:
            padded = buffers.get((id(module), "pad"), batch, (channels, height + 2 * ph, width + 2 * pw), x, zero=True)
            padded[:, :, ph : ph + height, pw : pw + width].copy_(x)  # the border stays zero
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = padded.stride()
    windows = padded.as_strided(
        (batch, channels, kh, kw, out_h, out_w), (s0, s1, dh * s2, dw * s3, sh * s2, sw * s3), padded.storage_offset()
    )
    cols = buffers.get((id(module), "cols"), batch, (channels * kh * kw, out_h * out_w), x)
    cols.view(batch, channels, kh, kw, out_h, out_w).copy_(windows)
    return cols


# Channels-last im2col (im2col + matmul) pays off from this many input channels on
# (micro-benchmark, 8x8 inputs, B = 32, paired against the NCHW path: 8 channels 0.91x,
# 12: 0.89x, 16: 0.87x, 64: 0.83-0.90x; 4 channels 1.03x, 1 channel 1.7-1.9x).
_CHANNELS_LAST_MIN = 8


def _channels_last_ok(module: nn.Conv2d) -> bool:
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.in_channels >= _CHANNELS_LAST_MIN
    )


def _conv2d_unfold_channels_last(module: nn.Conv2d, x: torch.Tensor, buffers: Buffers) -> torch.Tensor:
    """im2col of ``x`` as (B, Ho * Wo, kh * kw * Cin) (columns ordered kh, kw, Cin), in a reused buffer.

    The input is first copied into a zero-bordered channels-last buffer; each window row is then
    ``kw`` runs of ``Cin`` contiguous floats instead of the NCHW path's runs of ``Wo`` floats,
    and the per-sample gradient becomes a plain (not transposed) batched matmul."""
    batch, channels, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    padded = buffers.get((id(module), "pad_cl"), batch, (height + 2 * ph, width + 2 * pw, channels), x, zero=True)
    padded[:, ph : ph + height, pw : pw + width, :].copy_(x.permute(0, 2, 3, 1))  # the border stays zero
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = padded.stride()
    windows = padded.as_strided(
        (batch, out_h, out_w, kh, kw, channels), (s0, sh * s1, sw * s2, dh * s1, dw * s2, s3), padded.storage_offset()
    )
    cols = buffers.get((id(module), "cols_cl"), batch, (out_h * out_w, kh * kw * channels), x)
    cols.view(batch, out_h, out_w, kh, kw, channels).copy_(windows)
    return cols


def _add_conv2d_weight_grads(module: nn.Conv2d, call: Call, grad_out: torch.Tensor, layout: str, weight_sum: torch.Tensor,
                             first: bool, buffers: Buffers) -> None:
    """Add one call's per-sample weight gradients into ``weight_sum`` (in ``layout``; overwritten on the first call)."""
    if layout == "weight":  # grouped convolution
        batch, groups, c_out = grad_out.shape[0], module.groups, module.out_channels
        cols = _conv2d_unfold(module, call.activation, buffers)
        per_group = torch.einsum(
            "bgol,bgil->bgoi",
            grad_out.view(batch, groups, c_out // groups, -1),
            cols.view(batch, groups, cols.shape[1] // groups, -1),
        ).reshape(batch, c_out, -1)
        if first:
            weight_sum.copy_(per_group)
        else:
            weight_sum += per_group
        return
    # (Parameter tying: one matmul over the concatenated calls, K = 2L, measured 5 % slower.)
    if layout == "channels_last":
        left, right = grad_out, _conv2d_unfold_channels_last(module, call.activation, buffers)
    else:
        left, right = _conv2d_unfold(module, call.activation, buffers), grad_out.transpose(1, 2)
    if first:
        torch.bmm(left, right, out=weight_sum)
    else:
        weight_sum.baddbmm_(left, right)


def _conv2d_rule(module: nn.Conv2d, calls: list[Call], trainable: set, buffers: Buffers) -> tuple[torch.Tensor, Finish]:
    """Per-sample weight gradient = output gradient (B, Cout, L) @ unfolded input (B, L, Cin k k).

    The per-sample gradients are kept in whichever layout the fastest batched matmul writes
    (the squared norm does not depend on it); ``finish`` puts the clipped sum back into the
    weight's (Cout, Cin, kh, kw) layout:

    * ``channels_last`` (``groups == 1``, zero padding, >= 8 input channels): (B, Cout, kh kw Cin);
    * ``transposed`` (other ``groups == 1``): (B, Cin kh kw, Cout), the matmul with the unfolded
      input as its left operand (0.57x the time of the (B, Cout, Cin kh kw) product for Cin = 1);
    * grouped convolutions: (B, Cout, Cin/groups kh kw), the weight's own layout.
    """
    batch = calls[0].activation.shape[0]
    groups, c_out = module.groups, module.out_channels
    weight = module.weight
    c_in, (kh, kw) = weight.shape[1], module.kernel_size
    layout = "channels_last" if _channels_last_ok(module) else ("transposed" if groups == 1 else "weight")
    kept = _Materialised()
    weight_sum = None
    if weight in trainable:
        shape = (weight[0].numel(), c_out) if layout == "transposed" else (c_out, weight[0].numel())
        weight_sum = buffers.get((id(module), "grad", layout), batch, shape, weight)
    for k, call in enumerate(calls):
        grad_out = call.grad.reshape(batch, c_out, -1)  # (B, Cout, L)
        if weight_sum is not None:
            _add_conv2d_weight_grads(module, call, grad_out, layout, weight_sum, k == 0, buffers)
        kept.add(module.bias, grad_out.sum(dim=2), trainable)
    if weight_sum is not None:
        kept.add(weight, weight_sum, trainable)

    def finish(c: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out = {p: (c @ g.reshape(len(c), -1)) for p, g in kept.grads.items()}
        if weight in out:
            flat = out[weight]
            if layout == "channels_last":
                flat = flat.view(c_out, kh, kw, c_in).permute(0, 3, 1, 2)
            elif layout == "transposed":
                flat = flat.view(-1, c_out).t()
            out[weight] = flat.contiguous().view_as(weight)
        if module.bias is not None and module.bias in out:
            out[module.bias] = out[module.bias].view_as(module.bias)
        return out

    return kept.norm_sq(batch, calls[0].grad), finish


# One 2-D view per Conv1d, kept as long as the module lives: its id keys the reused work buffers.
_CONV1D_AS_2D: weakref.WeakKeyDictionary[nn.Conv1d, SimpleNamespace] = weakref.WeakKeyDictionary()


def _conv1d_as_conv2d(module: nn.Conv1d) -> SimpleNamespace:
    """The attributes the Conv2d rule reads, for ``module`` seen as a (1, k) convolution of a 1 x L image.

    The parameters are the module's own (3-D weight): the rule only reads their per-output-channel
    element count and writes its clipped sum back with ``view_as(weight)``. Reflect/replicate/circular
    padding carries over: the module's two amounts pad the time axis, zero the height-1 axis."""
    view = _CONV1D_AS_2D.get(module)
    if view is None:
        padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
        view = SimpleNamespace(
            weight=module.weight, bias=module.bias, groups=module.groups, in_channels=module.in_channels,
            out_channels=module.out_channels, kernel_size=(1, module.kernel_size[0]), stride=(1, module.stride[0]),
            dilation=(1, module.dilation[0]), padding=padding, padding_mode=module.padding_mode,
            _reversed_padding_repeated_twice=(*module._reversed_padding_repeated_twice, 0, 0))
        _CONV1D_AS_2D[module] = view
    return view


def _conv1d_rule(module: nn.Conv1d, calls: list[Call], trainable: set, buffers: Buffers) -> tuple[torch.Tensor, Finish]:
    """Conv1d as a Conv2d over (B, C, 1, L): the same per-sample matmuls, nothing new to get wrong."""
    as_images = [Call(call.activation.unsqueeze(2), call.grad) for call in calls]
    return _conv2d_rule(_conv1d_as_conv2d(module), as_images, trainable, buffers)  # type: ignore[arg-type]


def _linear_rule(module: nn.Linear, calls: list[Call], trainable: set, _buffers: Buffers) -> tuple[torch.Tensor, Finish]:
    """2-D inputs: ghost norm (with cross terms across tied calls); others: materialised."""
    batch = calls[0].activation.shape[0]
    weight, bias = module.weight, module.bias
    kept = _Materialised()
    flat = all(c.activation.dim() == 2 for c in calls)
    norm_sq = torch.zeros(batch, dtype=calls[0].grad.dtype, device=calls[0].grad.device)
    if weight in trainable:
        if flat:
            if len(calls) == 1:
                a, g = calls[0].activation, calls[0].grad
                norm_sq = norm_sq + a.square().sum(1) * g.square().sum(1)
            else:
                acts = torch.stack([c.activation for c in calls], dim=1)  # (B, K, in)
                grads = torch.stack([c.grad for c in calls], dim=1)  # (B, K, out)
                norm_sq = norm_sq + (torch.bmm(acts, acts.transpose(1, 2)) * torch.bmm(grads, grads.transpose(1, 2))).sum((1, 2))
        else:
            for call in calls:
                kept.add(weight, torch.einsum("b...o,b...i->boi", call.grad, call.activation), trainable)
    if bias is not None and bias in trainable:
        for call in calls:
            kept.add(bias, call.grad.reshape(batch, -1, bias.shape[0]).sum(1), trainable)
    norm_sq = norm_sq + kept.norm_sq(batch, norm_sq)

    def finish(c: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out = kept.finish(c)
        if flat and weight in trainable:
            total = None
            for call in calls:
                scaled = (call.grad * c[:, None]).t()
                total = scaled @ call.activation if total is None else total.addmm_(scaled, call.activation)
            out[weight] = total
        return out

    return norm_sq, finish


def _group_norm_rule(module: nn.GroupNorm, calls: list[Call], trainable: set, _buffers: Buffers) -> tuple[torch.Tensor, Finish]:
    batch = calls[0].activation.shape[0]
    kept = _Materialised()
    for call in calls:
        g = call.grad.reshape(batch, module.num_channels, -1)
        if module.weight is not None and module.weight in trainable:
            normed = F.group_norm(call.activation, module.num_groups, eps=module.eps).reshape(batch, module.num_channels, -1)
            kept.add(module.weight, (g * normed).sum(2), trainable)
        kept.add(module.bias, g.sum(2), trainable)
    return kept.norm_sq(batch, calls[0].grad), kept.finish


def _layer_norm_rule(module: nn.LayerNorm, calls: list[Call], trainable: set, _buffers: Buffers) -> tuple[torch.Tensor, Finish]:
    batch = calls[0].activation.shape[0]
    shape = tuple(module.normalized_shape)
    kept = _Materialised()
    for call in calls:
        g = call.grad.reshape(batch, -1, *shape)
        if module.weight is not None and module.weight in trainable:
            normed = F.layer_norm(call.activation, shape, eps=module.eps).reshape(batch, -1, *shape)
            kept.add(module.weight, (g * normed).sum(1), trainable)
        kept.add(module.bias, g.sum(1), trainable)
    return kept.norm_sq(batch, calls[0].grad), kept.finish


def _embedding_rule(module: nn.Embedding, calls: list[Call], trainable: set, _buffers: Buffers) -> tuple[torch.Tensor, Finish]:
    """Each sample's gradient rows scattered onto the rows it looked up: ``(B, num_embeddings, dim)``,
    materialised (position tables and byte vocabularies are small)."""
    batch = calls[0].activation.shape[0]
    kept = _Materialised()
    if module.weight in trainable:
        for call in calls:
            indices = call.activation.reshape(batch, -1, 1).expand(-1, -1, module.embedding_dim)
            per_sample = torch.zeros(batch, module.num_embeddings, module.embedding_dim, dtype=call.grad.dtype, device=call.grad.device)
            kept.add(module.weight, per_sample.scatter_add_(1, indices, call.grad.reshape(batch, -1, module.embedding_dim)), trainable)
    return kept.norm_sq(batch, calls[0].grad), kept.finish


SUPPORTED: dict[type[nn.Module], Callable[[nn.Module, list[Call], set, Buffers], tuple[torch.Tensor, Finish]]] = {
    nn.Conv1d: _conv1d_rule,
    nn.Conv2d: _conv2d_rule,
    nn.Embedding: _embedding_rule,
    nn.GroupNorm: _group_norm_rule,
    nn.LayerNorm: _layer_norm_rule,
    nn.Linear: _linear_rule,
}


def supported_types() -> str:
    return ", ".join(sorted(t.__name__ for t in SUPPORTED))
