"""Model FLOPs of a training micro batch: what MFU divides by the elapsed time and the card's peak.

One count for ``fvl bench step`` and for every training run (``train/tflops_per_s``, ``train/mfu``):
- a linear layer costs 2 x parameters per token forward; backward adds 2x for the input gradient when a
  trainable part lies before it (the gradient must flow through it) and 2x for the weight gradient when it
  trains. So a trainable LLM costs 6 N per token, a frozen LLM behind a trainable projector 4 N, a frozen
  LLM with nothing trainable before it 2 N. The input embedding is a lookup and counts nothing.
- self-attention's two matmuls: 4 x layers x hidden x (a sample's real tokens)^2 forward per sample (packed
  samples attend within themselves), times 3 when backward flows through the LLM (no weights: only the input
  gradient).
- the projector acts on image tokens; the tower and fusion's forward is counted once per image by torch's
  ``FlopCounterMode`` (3x when either trains); with cached features they never run.
Tokens are the batch's real tokens (``attention_mask``): padding is work the step did for nothing, so it
lowers MFU rather than raising it. Gradient checkpointing's recompute is not model FLOPs (left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 peak TFLOP/s of known cards (their data sheets; sparsity not counted), by a substring of
# ``torch.cuda.get_device_name()``; the first match wins. Elsewhere only ``train/tflops_per_s`` is logged.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def peak_tflops(device: torch.device | str | None = None) -> float | None:
    """The bf16 peak of a known CUDA card, else None (CPUs and unknown cards)."""
    if not torch.cuda.is_available() or torch.device(device or "cuda").type != "cuda":
        return None
    name = torch.cuda.get_device_name(device if device and torch.device(device).index is not None else None)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _params(module: nn.Module, trainable: bool, skip: nn.Parameter | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable and p is not skip)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass
class FlopCounter:
    """The per-token and per-image constants of one model's count (computed once: the trainable set must
    not change while it is used)."""

    llm_per_token: float
    attention_per_token_squared: float
    projector_per_token: float
    image_tokens: int
    features_per_image: float

    @classmethod
    def of(cls, model: nn.Module, cached_features: bool = False) -> FlopCounter:
        """The constants of a ``FlorenceVL`` as it trains now (its ``requires_grad`` flags). With
        ``cached_features`` (``data.feature_cache``) its batches never run the tower: neither does this."""
        embedding = model.llm.get_input_embeddings().weight
        towers_train = _trains(model.vision) or _trains(model.towers)
        upstream_trains = towers_train or _trains(model.fusion) or _trains(model.projector)
        llm_trains = _trains(model.llm)
        frozen_factor = 4 if (upstream_trains or llm_trains) else 2  # + the input gradient flowing through
        llm = 6 * _params(model.llm, True, embedding) + frozen_factor * _params(model.llm, False, embedding)
        cfg = model.llm.config
        attention = (
            4 * cfg.num_hidden_layers * cfg.hidden_size * (3 if (upstream_trains or llm_trains) else 1)
        )
        features_train = towers_train or _trains(model.fusion)
        projector = 6 * _params(model.projector, True) + (4 if features_train else 2) * _params(
            model.projector, False
        )
        images = 0.0 if cached_features else _features_forward(model) * (3 if features_train else 1)
        return cls(llm, attention, projector, model.num_image_tokens, images)

    def count(self, tokens: float, tokens_squared: float, images: int = 0, cached: bool = False) -> float:
        """Model FLOPs of a micro batch of ``tokens`` real tokens whose samples' lengths squared add up to
        ``tokens_squared``, with ``images`` images (as cached features when ``cached``)."""
        flops = self.llm_per_token * tokens + self.attention_per_token_squared * tokens_squared
        per_image = self.projector_per_token * self.image_tokens + (0 if cached else self.features_per_image)
        return flops + images * per_image

    def batch(self, batch: dict) -> float:
        """Model FLOPs of one collated micro batch (forward and backward). The loader's plain numbers
        (``num_tokens``, ``tokens_squared``: no host sync) when it sent them, else the attention mask's rows."""
        if "num_tokens" in batch and "tokens_squared" in batch:
            tokens, squared = float(batch["num_tokens"]), float(batch["tokens_squared"])
        else:
            rows = batch["attention_mask"].sum(dim=1).double()
            tokens, squared = float(rows.sum()), float((rows**2).sum())
        cached = "image_features" in batch
        images = (
            batch["image_features" if cached else "pixel_values"].shape[0]
            if (cached or "pixel_values" in batch)
            else 0
        )
        return self.count(tokens, squared, images, cached)


def _features_forward(model: nn.Module) -> float:
    """The towers' and fusion's forward FLOPs for one image, counted by torch on one blank image."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.vision.parameters()).device
    if device.type == "meta":
        return 0.0
    size = model.processor.transform.size
    pixels = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device)
    parts = (model.vision, model.towers, model.fusion)
    modes = [m.training for m in parts]
    for m in parts:
        m.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.fuse_images(pixels)
    finally:
        for m, mode in zip(parts, modes, strict=True):
            m.train(mode)
    return float(counter.get_total_flops())
