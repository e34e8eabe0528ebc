"""One feature alone (e.g. ``davit``), the CLIP-style single-layer baseline."""

import torch

from fvl.models.fusion.base import Fusion


class SingleLayerFusion(Fusion):
    def __init__(self, names, dims, tokens) -> None:
        if len(names) != 1:
            raise ValueError(f"single_layer takes exactly one feature, got {list(names)}")
        super().__init__(names, dims, tokens)

    @property
    def output_dim(self) -> int:
        return self.dims[self.names[0]]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._select(features)[0]
