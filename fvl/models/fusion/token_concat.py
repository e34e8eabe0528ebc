"""Token integration: concatenate features along the sequence (k x N tokens; the paper's 1728 at k=3)."""

import torch

from fvl.models.fusion.base import Fusion


class TokenConcatFusion(Fusion):
    def __init__(self, names, dims, tokens) -> None:
        super().__init__(names, dims, tokens)
        self._common_width()  # adapters for narrower features (another tower's), made here

    @property
    def output_dim(self) -> int:
        return self._common_width()

    @classmethod
    def tokens_for(cls, n_features: int, in_tokens: int) -> int:
        return in_tokens * n_features

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(self._select(features), dim=1)
