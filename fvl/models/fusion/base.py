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
        adapters = getattr(self, "adapters", None)
        if not adapters:
            return [features[n] for n in self.names]
        return [adapters[_key(n)](features[n]) if _key(n) in adapters else features[n] for n in self.names]

    def _common_width(self) -> int:
        """For a fusion that lines features up element by element (token concat, average pooling): the widest
        feature's width. Narrower ones (another tower's: Florence-2-large's 1024 beside SigLIP-so400m's 1152)
        get a learned linear map to it (``adapters``, made once, at construction, and trained with the
        fusion); features of one width need none, and the fusion stays parameter-free."""
        width = max(self.dims.values())
        if not hasattr(self, "adapters"):
            self.adapters = nn.ModuleDict(
                {_key(n): nn.Linear(d, width) for n, d in self.dims.items() if d != width}
            )
        return width


def _key(name: str) -> str:
    """A feature name as a module key (``siglip.layer_-2`` -> ``siglip__layer_-2``: no dots in module names)."""
    return name.replace(".", "__")
