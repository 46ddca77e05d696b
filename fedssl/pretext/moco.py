"""MoCo: momentum contrast, and a variant whose negatives carry no private data.

A query encoder (the shared encoder + a projector) embeds one augmented view; a *key* encoder, an
exponential moving average of the query encoder that receives no gradient, embeds another view of
the same sample. Sample i's loss is the InfoNCE cross-entropy of its query against its own key
(the positive) and a set of negative keys.

**Where the negatives come from decides DP, and fedssl offers two methods.**

* ``moco`` (the paper): the negatives are a FIFO queue of the keys of earlier batches. Within one
  step sample i's loss depends on sample i and the (fixed) queue only, so per-sample clipping
  looks exact — but the queue is computed from earlier samples' raw data and never noised: a
  sample seen in step t shapes every other sample's loss in the steps after it. DP-SGD's analysis
  needs each step's gradient to depend on the current batch and on *privatized* state only, so the
  guarantee is void. ``moco`` is refused under DP (``tests/pretext/test_moco.py`` shows the
  cross-step influence as an attack), and runs with ``privacy.enabled=false``.
* ``moco_noise`` (DP-valid): the negatives are the key encoder's embeddings of fresh uniform-noise
  inputs drawn each step. They depend on no sample, and the key encoder is an average of
  already-privatized weights (post-processing), so sample i's loss depends on sample i alone and
  the method is DP-compatible — at the price of easier negatives than real data gives. A queue of
  the site's *own* past keys would not fix it: the coupling is the problem, not who owns the data.

Differences from the papers, for small private models: LayerNorm in the projector (BatchNorm mixes
samples), one asymmetric loss (MoCo v2), constant momentum ``tau``.

- [0] He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
  Learning", CVPR 2020, https://arxiv.org/abs/1911.05722
- [1] Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning" (MoCo v2),
  arXiv 2003.04297
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.nn import functional as F

from fedssl.inputs import COUPLED_PRETEXTS, PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.augment import Augmenter, TwoViewParams
from fedssl.pretext.base import PretextModel, PretextTask, ema_update, mlp, param
from fedssl.pretext.registry import register_pretext


def info_nce_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample InfoNCE: ``-log softmax([q.k+, q.n_1, ..., q.n_K] / T)[0]`` on L2-normalised vectors.

    ``negatives`` is ``(K, d)`` shared by the batch, or ``(B, K, d)`` per sample; shape ``(B,)``."""
    q, k = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
    n = F.normalize(negatives, dim=-1)
    pos = (q * k).sum(-1, keepdim=True)
    neg = q @ n.T if n.dim() == 2 else torch.einsum("bd,bkd->bk", q, n)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device), reduction="none")


@dataclasses.dataclass(frozen=True)
class MoCoParams(TwoViewParams):
    tau: float = param(0.99, ge=0, le=1)  # key encoder momentum
    temperature: float = param(0.2, gt=0)
    num_negatives: int = param(256, ge=1)  # queue length (moco) or noise inputs per step (moco_noise)


class MoCoModel(PretextModel):
    def __init__(self, encoder: Encoder, augment: Augmenter, params: MoCoParams, negatives: str) -> None:
        super().__init__(encoder)
        self.augment = augment
        self.params = params
        self.negatives = negatives
        self.projector = mlp(encoder.out_dim, params.hidden_dim, params.projection_dim)
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if negatives == "queue":
            self.register_buffer("queue", F.normalize(torch.randn(params.num_negatives, params.projection_dim), dim=-1))
            self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.key_projector(self.key_encoder(x))

    def _negatives(self, like: torch.Tensor) -> torch.Tensor:
        if self.negatives == "queue":
            return self.queue.clone()
        noise = torch.rand(self.params.num_negatives, *self.encoder.input_shape, device=like.device, dtype=like.dtype)
        return self._keys(noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.projector(self.encoder(self.augment(x)))
        key = self._keys(self.augment(x))
        loss = info_nce_loss(query, key, self._negatives(x), self.params.temperature)
        if self.negatives == "queue" and self.training and torch.is_grad_enabled():
            self._enqueue(F.normalize(key, dim=-1))
        return loss

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = len(self.queue)
        for key in keys[-size:]:
            self.queue[self.queue_next] = key
            self.queue_next.copy_((self.queue_next + 1) % size)

    def after_optimizer_step(self) -> None:
        ema_update([self.encoder, self.projector], [self.key_encoder, self.key_projector], self.params.tau)


@register_pretext
class MoCo(PretextTask):
    name = "moco"
    paper = "He et al., CVPR 2020, Momentum Contrast for Unsupervised Visual Representation Learning"
    dp_compatible = False
    coupling = COUPLED_PRETEXTS["moco"]
    modalities = PRETEXT_MODALITIES["moco"]  # fedssl.inputs
    Params = MoCoParams
    params: MoCoParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return MoCoModel(encoder, Augmenter(self.params, modality), self.params, negatives="queue")


@register_pretext
class MoCoNoise(PretextTask):
    name = "moco_noise"
    paper = "He et al., CVPR 2020 (MoCo), with data-independent negatives: uniform-noise keys drawn each step"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["moco_noise"]  # fedssl.inputs
    Params = MoCoParams
    params: MoCoParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return MoCoModel(encoder, Augmenter(self.params, modality), self.params, negatives="noise")
