"""ts_views: SimSiam over two augmented views of a time series (model.encoder=conv1d).

The views come from the time-series augmentations of TS-TCC -- jitter, per-channel scaling,
segment permutation -- plus a random crop (fedssl.pretext.ts_augment). The objective is SimSiam's,
reused as it is (fedssl.pretext.simsiam: projector, bottleneck predictor, symmetrised negative
cosine with a stop-gradient): no negatives, so sample i's loss involves sample i's two views
only, and the method is DP-valid. TS-TCC's own contrastive losses use in-batch negatives (NT-Xent),
which would couple samples: that is why the objective here is SimSiam's.

- [0] Eldele, Ragab, Chen, Wu, Kwoh, Li, Guan, "Time-Series Representation Learning via Temporal
  and Contextual Contrasting", IJCAI 2021, https://arxiv.org/abs/2106.14112 (augmentations)
- [1] Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
  https://arxiv.org/abs/2011.10566 (objective)
"""

from __future__ import annotations

import dataclasses

from fedssl.inputs import PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextTask, param
from fedssl.pretext.registry import register_pretext
from fedssl.pretext.simsiam import SimSiamModel
from fedssl.pretext.ts_augment import SeriesAugmenter, SeriesAugmentParams


@dataclasses.dataclass(frozen=True)
class TSViewsParams(SeriesAugmentParams):
    """The augmentations' strengths plus SimSiam's head sizes (the fields SimSiamModel reads)."""

    hidden_dim: int = param(256, ge=1)
    projection_dim: int = param(64, ge=1)
    predictor_hidden_dim: int = param(16, ge=1)


@register_pretext
class TSViews(PretextTask):
    name = "ts_views"
    paper = "Eldele et al., IJCAI 2021, TS-TCC (augmentations) with the SimSiam objective (Chen & He, CVPR 2021)"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["ts_views"]
    Params = TSViewsParams
    params: TSViewsParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return SimSiamModel(encoder, SeriesAugmenter(self.params), self.params)  # type: ignore[arg-type]
