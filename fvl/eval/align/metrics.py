"""The alignment analysis's numbers as pure functions of unit vectors, and its projection (why an MLP:
see the package docstring)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fvl.models.projector import mlp_gelu

# ---- metrics: pure functions of unit vectors [N, D] (row i of vision pairs with row i of text) --------------


def contrastive_loss(vision: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of softmax(vision @ text.T / temperature) per row against its own pair (the diagonal)."""
    logits = vision @ text.T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(len(vision), device=vision.device))


def full_batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches of exactly ``batch_size`` rows; a remainder is left out, so that every batch has
    the same chance level."""
    if n < batch_size:
        raise ValueError(f"{n} pairs: fewer than one batch of {batch_size}")
    return [slice(s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size)]


def heldout_loss(vision: torch.Tensor, text: torch.Tensor, temperature: float, batch_size: int) -> float:
    """The training loss, averaged over consecutive batches of ``batch_size`` pairs. An image embedding that
    ignores the image scores at least log(batch_size): each row of logits is then the same vector s, and the
    loss is logsumexp(s) - mean(s)."""
    losses = [
        contrastive_loss(vision[b], text[b], temperature) for b in full_batches(len(vision), batch_size)
    ]
    return float(torch.stack(losses).mean())


def retrieval_top1(vision: torch.Tensor, text: torch.Tensor, batch_size: int) -> float:
    """Image -> text top-1 retrieval within consecutive batches of ``batch_size`` pairs: the fraction of images
    whose own caption scores strictly above every other caption of the batch (chance 1 / batch_size). Strictly,
    so that a tie (identical vectors, duplicate captions) is a miss and not an argmax's arbitrary pick."""
    hits = []
    for b in full_batches(len(vision), batch_size):
        scores = vision[b] @ text[b].T
        own = scores.diagonal()
        others = scores.masked_fill(torch.eye(len(own), dtype=torch.bool, device=scores.device), -math.inf)
        hits.append(own > others.max(dim=1).values)
    return float(torch.cat(hits).float().mean())


def matched_vs_shuffled(vision: torch.Tensor, text: torch.Tensor, mismatch: torch.Tensor) -> float:
    """The fraction of images whose own caption scores above the mismatched caption ``text[mismatch[i]]``
    (chance 0.5); a tie (the same caption twice, identical embeddings) counts one half."""
    own = (vision * text).sum(-1)
    other = (vision * text[mismatch]).sum(-1)
    return float(((own > other).float() + 0.5 * (own == other).float()).mean())


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (each image gets another image's caption): one cycle through
    a random order."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def split_pairs(
    n: int, heldout: float, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(train, held-out)`` indices. The held-out part is about ``heldout * n`` pairs, rounded to
    whole batches (so that every held-out pair is scored at the same chance level), and at least one batch;
    the training part keeps at least one batch."""
    held = heldout_size(n, heldout, batch_size)
    order = torch.randperm(n, generator=generator)
    return order[held:], order[:held]


def heldout_size(n: int, heldout: float, batch_size: int) -> int:
    """Held-out pairs of ``split_pairs``: about ``heldout * n``, in whole batches, leaving a training batch."""
    if n < 2 * batch_size:
        raise ValueError(f"{n} caption pairs: need at least 2 x batch_size = {2 * batch_size}")
    return batch_size * min(max(1, round(heldout * n / batch_size)), (n - batch_size) // batch_size)


# ---- the projection ------------------------------------------------------------------------------------------


def projection(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """Linear -> GELU -> Linear, the model's ``mlp2x_gelu`` projector with a hidden width fixed across
    variants (so that parameter counts differ only by the fused feature width)."""
    return mlp_gelu(in_dim, out_dim, hidden, depth=2)


def pooled(proj: nn.Module, fused: torch.Tensor) -> torch.Tensor:
    """``[B, tokens, dim]`` -> unit vectors ``[B, out]``: the mean over tokens is taken after ``proj``, so a
    nonlinear ``proj`` sees each token (and each feature of a token_concat) on its own."""
    return nn.functional.normalize(proj(fused).mean(1), dim=-1)
