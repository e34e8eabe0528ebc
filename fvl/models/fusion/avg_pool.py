"""Average pooling: the element-wise mean of the features (N tokens of width D)."""

import torch

from fvl.models.fusion.base import Fusion


class AveragePoolFusion(Fusion):
    @property
    def output_dim(self) -> int:
        return self._require_equal_dims("avg_pool")

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self._select(features), dim=0).mean(dim=0)
