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

Only layers with a rule (fedssl.training.clip_rules) may hold trainable parameters; anything else is
refused with a ``ValueError``, never skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedssl.training.clip_rules import SUPPORTED, Buffers, Call, supported_types

NORM_EPS = 1e-6  # Opacus' DPOptimizer.clip_and_accumulate: max_grad_norm / (norm + 1e-6)


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
        self.calls: dict[nn.Module, list[Call]] = {m: [] for m in self.layers}
        self._recording = False
        self._buffers = Buffers()
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
        call = Call(inputs[0].detach())
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
