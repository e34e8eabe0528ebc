"""Average pooling: the element-wise mean of the features (N tokens of width D)."""

import torch

from fvl.models.fusion.base import Fusion


class AveragePoolFusion(Fusion):
    def __init__(self, names, dims, tokens) -> None:
        super().__init__(names, dims, tokens)
        self._common_width()  # adapters for narrower features (another tower's), made here

    @property
    def output_dim(self) -> int:
        return self._common_width()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self._select(features), dim=0).mean(dim=0)
