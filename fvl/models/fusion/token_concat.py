"""Token integration: concatenate features along the sequence (k x N tokens; the paper's 1728 at k=3)."""

import torch

from fvl.models.fusion.base import Fusion


class TokenConcatFusion(Fusion):
    @property
    def output_dim(self) -> int:
        return self._require_equal_dims("token_concat")

    @classmethod
    def tokens_for(cls, n_features: int, in_tokens: int) -> int:
        return in_tokens * n_features

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(self._select(features), dim=1)
