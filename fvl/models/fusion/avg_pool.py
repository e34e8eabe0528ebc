"""Average pooling: the element-wise mean of the features (N tokens of width D)."""

import torch

from fvl.models.fusion.base import Fusion


class AveragePoolFusion(Fusion):
    @property
    def output_dim(self) -> int:
        return self._require_equal_dims("avg_pool")

    @property
    def output_tokens(self) -> int:
        return self.in_tokens

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self._select(features), dim=0).mean(dim=0)
