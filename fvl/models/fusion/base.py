"""The fusion contract: named features ``{name: [B, N, D_name]}`` -> one sequence ``[B, tokens, dim]``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class Fusion(nn.Module):
    """Fuses the features listed in ``names`` (in that order). Parameter-free in the paper's variants;
    a learned fusion subclasses this and owns its parameters (they train with the projector)."""

    def __init__(self, names: Sequence[str], dims: Mapping[str, int], tokens: int) -> None:
        super().__init__()
        self.names = list(names)
        self.dims = {n: int(dims[n]) for n in self.names}
        self.in_tokens = int(tokens)

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    @classmethod
    def tokens_for(cls, n_features: int, in_tokens: int) -> int:
        """Output tokens for ``n_features`` features of ``in_tokens`` tokens each (known before building)."""
        return in_tokens

    @property
    def output_tokens(self) -> int:
        return self.tokens_for(len(self.names), self.in_tokens)

    def _select(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in features]
        if missing:
            raise KeyError(f"fusion needs features {missing}; got {list(features)}")
        return [features[n] for n in self.names]

    def _require_equal_dims(self, variant: str) -> int:
        if len(set(self.dims.values())) != 1:
            raise ValueError(f"{variant} needs features of one width; got {self.dims}")
        return next(iter(self.dims.values()))
