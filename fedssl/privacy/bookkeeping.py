"""Book-keeping (BK) per-sample clipping for DP-SGD: one backward pass, no ordinary weight gradients.

Bu, Wang, Zha, Karypis, "Differentially Private Optimization on Large Model at Small Cost",
ICML 2023, https://arxiv.org/abs/2210.00038.

Opacus' ``hooks`` mode lets autograd compute the ordinary (summed) weight gradient, throws it
away, and computes per-sample gradients on top. Book-keeping instead:

* freezes the trainable weights *while the forward pass builds the graph*, so the backward
  pass computes only the gradients that flow between layers (``convolution_backward`` is
  called with the weight and bias entries of its output mask off);
* keeps, per call of each trainable layer, its input activation (forward hook) and the
  gradient of the loss with respect to its output (a tensor hook on the output);
* turns those into per-sample gradients (Conv2d: a batched matmul of output gradients with
  unfolded inputs, the FLOPs of the ordinary weight gradient; GroupNorm / LayerNorm / bias:
  small per-channel sums) or, for 2-D Linear inputs, ghost norms (Li et al. 2022) that never
  materialise the ``B x out x in`` tensor;
* sums a layer's per-sample gradients over all its calls *before* taking norms (parameter
  tying: BYOL and SimSiam run the encoder twice per sample), adds the squared norms over all
  layers, and clips exactly as Opacus does: ``c_i = min(1, C / (||g_i|| + 1e-6))``;
* writes the clipped sum ``sum_i c_i g_i`` into ``p.grad``.

Noise, the ``expected_batch_size`` scaling and the accountant's step hook stay Opacus' own:
:class:`BookkeepingDPOptimizer` is an ``opacus.optimizers.DPOptimizerFastGradientClipping``
(which expects the clipped sum in ``p.grad``) whose ``pre_step`` first fills ``p.grad``.

Only layers with a rule may hold trainable parameters (:data:`SUPPORTED`); anything else is
refused with a ``ValueError``, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

NORM_EPS = 1e-6  # Opacus' DPOptimizer.clip_and_accumulate: max_grad_norm / (norm + 1e-6)


@dataclass
class _Call:
    """One call of a trainable layer: its input, and (after backward) its output gradient."""

    activation: torch.Tensor
    grad: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Per-layer rules. Each takes the layer and its calls (with output gradients) and returns
# (squared per-sample norm of the layer's trainable parameters, shape (B,);
#  finish(c) -> {param: sum_i c_i * g_i}).

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


class _Buffers:
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


def _conv2d_unfold(module: nn.Conv2d, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
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


def _conv2d_unfold_channels_last(module: nn.Conv2d, x: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
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


def _conv2d_rule(module: nn.Conv2d, calls: list[_Call], trainable: set, buffers: _Buffers) -> tuple[torch.Tensor, Finish]:
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
        if weight_sum is not None and layout != "weight":
            # (Parameter tying: one matmul over the concatenated calls, K = 2L, measured 5 % slower.)
            if layout == "channels_last":
                left, right = grad_out, _conv2d_unfold_channels_last(module, call.activation, buffers)
            else:
                left, right = _conv2d_unfold(module, call.activation, buffers), grad_out.transpose(1, 2)
            if k == 0:
                torch.bmm(left, right, out=weight_sum)
            else:
                weight_sum.baddbmm_(left, right)
        elif weight_sum is not None and layout == "weight":
            cols = _conv2d_unfold(module, call.activation, buffers)
            per_group = torch.einsum(
                "bgol,bgil->bgoi",
                grad_out.view(batch, groups, c_out // groups, -1),
                cols.view(batch, groups, cols.shape[1] // groups, -1),
            ).reshape(batch, c_out, -1)
            if k == 0:
                weight_sum.copy_(per_group)
            else:
                weight_sum += per_group
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


def _linear_rule(module: nn.Linear, calls: list[_Call], trainable: set, _buffers: _Buffers) -> tuple[torch.Tensor, Finish]:
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


def _group_norm_rule(module: nn.GroupNorm, calls: list[_Call], trainable: set, _buffers: _Buffers) -> tuple[torch.Tensor, Finish]:
    batch = calls[0].activation.shape[0]
    kept = _Materialised()
    for call in calls:
        g = call.grad.reshape(batch, module.num_channels, -1)
        if module.weight is not None and module.weight in trainable:
            normed = F.group_norm(call.activation, module.num_groups, eps=module.eps).reshape(batch, module.num_channels, -1)
            kept.add(module.weight, (g * normed).sum(2), trainable)
        kept.add(module.bias, g.sum(2), trainable)
    return kept.norm_sq(batch, calls[0].grad), kept.finish


def _layer_norm_rule(module: nn.LayerNorm, calls: list[_Call], trainable: set, _buffers: _Buffers) -> tuple[torch.Tensor, Finish]:
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


SUPPORTED: dict[type[nn.Module], Callable[[nn.Module, list[_Call], set, _Buffers], tuple[torch.Tensor, Finish]]] = {
    nn.Conv2d: _conv2d_rule,
    nn.GroupNorm: _group_norm_rule,
    nn.LayerNorm: _layer_norm_rule,
    nn.Linear: _linear_rule,
}


def supported_types() -> str:
    return ", ".join(sorted(t.__name__ for t in SUPPORTED))


# ---------------------------------------------------------------------------------------------
# The engine


class BookkeepingEngine:
    """Hooks a model so that ``loss.backward()`` skips weight gradients and
    :meth:`write_clipped_sum` puts ``sum_i clip_C(g_i)`` into each trainable ``p.grad``.

    ``loss_reduction="mean"`` (what ``fedssl.training.local`` backpropagates) means per-sample
    gradients are the backpropagated ones times the batch size, as in Opacus.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction: valid choices: mean, sum, got {loss_reduction!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.layers: list[nn.Module] = []
        self.params: list[nn.Parameter] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(module) not in SUPPORTED:
                raise ValueError(
                    f"bookkeeping clipping: module {name or '<root>'!r} of type {type(module).__name__} has trainable "
                    f"parameters but no per-sample gradient rule; supported types: {supported_types()} "
                    "(freeze it, or use privacy.clipping=opacus)"
                )
            self.layers.append(module)
            self.params.extend(own)
        if not self.params:
            raise ValueError("bookkeeping clipping: the model has no trainable parameters")
        self._trainable = set(self.params)
        self.calls: dict[nn.Module, list[_Call]] = {m: [] for m in self.layers}
        self._recording = False
        self._buffers = _Buffers()
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]
        self._handles.append(model.register_forward_pre_hook(self._before_forward))
        self._handles.append(model.register_forward_hook(self._after_forward, always_call=True))

    # -- hooks --------------------------------------------------------------------------------
    def _before_forward(self, _module: nn.Module, _inputs) -> None:
        if any(call.grad is not None for calls in self.calls.values() for call in calls):
            raise RuntimeError(
                "bookkeeping clipping: a second forward after backward without an optimizer step; "
                "gradient accumulation breaks Poisson-sampled DP-SGD accounting (Opacus forbids it too)"
            )
        self.clear()
        self._recording = torch.is_grad_enabled()
        if self._recording:
            # The graph is built without weight edges: backward then never computes weight gradients.
            for p in self.params:
                p.requires_grad_(False)

    def _after_forward(self, _module: nn.Module, _inputs, _output) -> None:
        self._recording = False
        for p in self.params:
            p.requires_grad_(True)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not (self._recording and torch.is_grad_enabled()):
            # Outside the hooked model's forward, or under no_grad (BYOL's target): nothing to record.
            return None
        call = _Call(inputs[0].detach())
        self.calls[module].append(call)
        if not output.requires_grad:
            # No trainable layer upstream: make the output a leaf so its gradient still arrives.
            output = output.detach().requires_grad_(True)

        def keep(grad: torch.Tensor) -> None:
            call.grad = grad

        output.register_hook(keep)
        return output

    # -- clipping -----------------------------------------------------------------------------
    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def batch_size(self) -> int:
        sizes = {call.activation.shape[0] for calls in self.calls.values() for call in calls}
        if len(sizes) > 1:
            raise RuntimeError(f"bookkeeping clipping: layers saw different batch sizes {sorted(sizes)}; the batch axis must be the sample axis")
        return sizes.pop() if sizes else 0

    def write_clipped_sum(self, max_grad_norm: float) -> torch.Tensor:
        """Set ``p.grad = sum_i c_i g_i`` for every trainable parameter; return the per-sample norms."""
        batch = self.batch_size()
        ref = self.params[0]
        if batch == 0:
            for p in self.params:
                p.grad = torch.zeros_like(p)
            self.clear()
            return torch.zeros(0, dtype=ref.dtype, device=ref.device)
        norm_sq = torch.zeros(batch, dtype=ref.dtype, device=ref.device)
        finishers = []
        for module in self.layers:
            calls = [c for c in self.calls[module] if c.grad is not None]
            if not calls:
                continue
            layer_sq, finish = SUPPORTED[type(module)](module, calls, self._trainable, self._buffers)
            norm_sq += layer_sq
            finishers.append(finish)
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        norms = norm_sq.sqrt() * scale
        factor = (max_grad_norm / (norms + NORM_EPS)).clamp(max=1.0)
        weights = factor * scale
        grads: dict[nn.Parameter, torch.Tensor] = {}
        for finish in finishers:
            grads.update(finish(weights))
        for p in self.params:
            p.grad = grads.get(p)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.clear()
        return norms

    def remove(self) -> None:
        """Remove the hooks; the model is then an ordinary module again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.params:
            p.requires_grad_(True)
        self.clear()


def _opacus_optimizer_class():
    from opacus.optimizers import DPOptimizerFastGradientClipping

    return DPOptimizerFastGradientClipping


class BookkeepingDPOptimizer(_opacus_optimizer_class()):
    """Opacus' fast-gradient-clipping DP optimizer (noise, scaling, accountant hook: Opacus'
    own code), fed ``p.grad = sum_i clip_C(g_i)`` by a :class:`BookkeepingEngine`."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, engine: BookkeepingEngine, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.engine = engine
        covered = set(engine.params)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in covered:
                    raise ValueError("bookkeeping clipping: the optimizer holds a parameter the model does not train")

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self.engine.clear()

    def accumulate(self) -> None:
        """Opacus' ``accumulate`` without its ``copy.deepcopy(p.grad)``: the engine has just written
        a fresh ``p.grad`` for this step alone, and ``add_noise`` replaces ``p.grad`` by a new
        tensor, so ``p.summed_grad`` can take it as is (the deepcopy of the demo model's 14
        gradients cost ~0.4 ms a step)."""
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad

    def pre_step(self, closure=None):
        self.engine.write_clipped_sum(self.max_grad_norm)
        return super().pre_step(closure)


def make_private_bookkeeping(
    privacy_engine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator | None = None,
    loss_reduction: str = "mean",
) -> tuple[nn.Module, BookkeepingDPOptimizer, DataLoader]:
    """``PrivacyEngine.make_private(..., poisson_sampling=True)`` with book-keeping clipping.

    Same contract as Opacus': the module is validated by Opacus' ``ModuleValidator``, the
    loader becomes a Poisson ``DPDataLoader`` (sample rate ``1 / len(data_loader)``), and the
    optimizer's step hook steps ``privacy_engine.accountant``. The module itself is returned
    (hooked in place, not wrapped): its state-dict keys do not change.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.validators import ModuleValidator

    if not isinstance(max_grad_norm, (int, float)):
        raise ValueError("bookkeeping clipping: only flat clipping (one float max_grad_norm) is supported")
    model_params = set(module.parameters())
    if any(p not in model_params for p in _optimizer_params(optimizer)):
        raise ValueError("Module parameters are different than optimizer Parameters")
    ModuleValidator.validate(module, strict=True)
    engine = BookkeepingEngine(module, loss_reduction=loss_reduction)
    loader = DPDataLoader.from_data_loader(data_loader, generator=privacy_engine.secure_rng, distributed=False)
    sample_rate = 1 / len(loader)
    expected_batch_size = int(len(loader.dataset) * sample_rate)
    dp_optimizer = BookkeepingDPOptimizer(
        optimizer,
        engine=engine,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
        generator=privacy_engine.secure_rng if privacy_engine.secure_mode else noise_generator,
        secure_mode=privacy_engine.secure_mode,
    )
    dp_optimizer.attach_step_hook(privacy_engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return module, dp_optimizer, loader


def _optimizer_params(optimizer: torch.optim.Optimizer) -> Iterable[nn.Parameter]:
    for group in optimizer.param_groups:
        yield from group["params"]
