"""Typed schema of the evaluation and analysis options: ``eval:`` in an experiment YAML (what sweeps score),
and the options of ``fvl eval``, ``fvl align`` and ``fvl pca`` (their parsers are generated from these)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """Scoring a checkpoint.

    bench: ``synthetic`` (the generated test split, per skill) or NAME=PATH for a local parquet copy of a
      public benchmark (textvqa, vqav2, vizwiz, gqa, pope, chartqa, docvqa, infovqa, mmbench, seed, ai2d,
      scienceqa_img); repeatable.
    samples: synthetic test questions (100 per skill kind at 700); 0 skips evaluation in a sweep.
    batch_size: prompts generated together (greedy, KV cache).
    max_new_tokens: longest answer.
    """

    bench: list[str] = field(default_factory=lambda: ["synthetic"], metadata={"repeat": True})
    samples: int = 700
    batch_size: int = 32
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.samples < 0 or self.batch_size <= 0 or self.max_new_tokens <= 0:
            raise ValueError("eval: samples must be >= 0, batch_size and max_new_tokens positive")


@dataclass
class AlignConfig:
    """The paper's vision-language alignment loss (frozen tower and LLM, a trained linear projection).

    variant: fusion YAML or LABEL=FUSION:feature+feature, e.g. -ocr=dbfusion:davit+caption+grounding;
      repeatable (default: dbfusion, its four leave-one-out ablations and davit alone).
    steps: optimisation steps per variant.
    batch_size: caption pairs per step (the softmax runs over the batch).
    samples: synthetic caption pairs.
    lr: Adam learning rate of the projection.
    temperature: softmax temperature of the matching logits.
    seed: random seed.
    """

    variant: list[str] = field(default_factory=list, metadata={"repeat": True})
    steps: int = 200
    batch_size: int = 64
    samples: int = 1024
    lr: float = 1e-3
    temperature: float = 0.07
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 1 or self.samples < self.batch_size:
            raise ValueError("align: steps positive, batch_size > 1, samples >= batch_size")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("align: lr and temperature must be positive")


@dataclass
class PCAConfig:
    """The first three principal components of each named vision feature, shown as RGB (the paper's Fig. 3).

    image: image file (default: a synthetic test image).
    index: synthetic test image index when no image is given.
    feature: feature names (default: all the tower has); repeatable.
    threshold: first-component threshold below which a token counts as background (shown black).
    """

    image: str | None = None
    index: int = 0
    feature: list[str] = field(default_factory=list, metadata={"repeat": True})
    threshold: float = 0.5
