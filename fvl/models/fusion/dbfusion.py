"""DBFusion, the paper's channel integration: concatenate features along channels (4 x D for the default)."""

import torch

from fvl.models.fusion.base import Fusion


class ChannelConcatFusion(Fusion):
    @property
    def output_dim(self) -> int:
        return sum(self.dims.values())

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(self._select(features), dim=-1)
