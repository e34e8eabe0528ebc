"""Settings of stage 0 (``fvl florence2-tiny``), importable without torch (the CLI's parser reads them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FORMAT_VERSION = 2  # bumped when the recipe changes, so that cached builds are redone


def tiny_arch() -> dict[str, Any]:
    """The tiny preset's Florence-2 architecture (``experiments/models/tiny.yaml``'s ``model.vision.arch``)."""
    from fvl.config import load
    from fvl.config.model import plain_dict

    return plain_dict(load("tiny").model.vision.arch)


@dataclass
class Florence2TinyConfig:
    """Training the tiny Florence-2 on its own tasks (stage 0).

    steps: optimisation steps.
    batch_size: examples per step (each one task of one picture, the task drawn uniformly).
    lr: AdamW learning rate (cosine decay after a 5 % warm-up) of everything but DaViT.
    davit_lr: DaViT's learning rate (same schedule); 0 keeps DaViT at its random initialisation. Training
      DaViT at ``lr`` wrecked what its random features carry before the decoder learnt to read them (AdamW
      turns the early, near-noise gradients into full-size steps): its captions then named the colour of
      25 % of pictures, against 84 % with DaViT frozen and 98 % at 1e-4 (BENCHMARKS.md).
    samples: training pictures (drawn once, cycled).
    eval_samples: validation pictures for the task metrics.
    image_size: picture side in pixels (the tiny preset's).
    seed: seed of the initialisation and the batch order (the pictures come from the data seed 0).
    decoder_reads: image (the decoder attends to the image tokens alone, so each prompt's reading of the
      picture must be written into them: the features Florence-VL fuses) or all (Florence-2's own layout).
    """

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    davit_lr: float = 0.0
    samples: int = 8000
    eval_samples: int = 210
    image_size: int = 64
    seed: int = 0
    decoder_reads: str = "image"

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.samples, self.eval_samples) <= 0 or self.lr <= 0:
            raise ValueError(
                "florence2-tiny: steps, batch_size, samples, eval_samples and lr must be positive"
            )
        if self.davit_lr < 0:
            raise ValueError("florence2-tiny: davit_lr must be >= 0 (0 keeps DaViT frozen)")
        if self.decoder_reads not in ("image", "all"):
            raise ValueError(
                f"florence2-tiny: decoder_reads must be 'image' or 'all', not {self.decoder_reads!r}"
            )

    def key(self) -> dict[str, Any]:
        """What decides the weights: a cached build is reused only when all of it matches."""
        from fvl.synthetic import GENERATOR_VERSION

        return {**asdict(self), "arch": tiny_arch(), "format": FORMAT_VERSION, "generator": GENERATOR_VERSION}
