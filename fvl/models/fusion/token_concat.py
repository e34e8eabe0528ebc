"""Token integration: concatenate features along the sequence (k x N tokens; the paper's 1728 at k=3)."""

import torch

from fvl.models.fusion.base import Fusion


class TokenConcatFusion(Fusion):
    @property
    def output_dim(self) -> int:
        return self._require_equal_dims("token_concat")

    @property
    def output_tokens(self) -> int:
        return self.in_tokens * len(self.names)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(self._select(features), dim=1)
