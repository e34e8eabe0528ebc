"""Training each variant's projection per seed on the training pairs and scoring it on the held-out ones."""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fvl.config.eval import AlignConfig
from fvl.config.model import FusionConfig
from fvl.eval.align.metrics import (
    contrastive_loss,
    derangement,
    full_batches,
    heldout_loss,
    heldout_size,
    matched_vs_shuffled,
    pooled,
    projection,
    retrieval_top1,
    split_pairs,
)
from fvl.eval.align.pairs import PairFeatures, encode_pairs
from fvl.models.fusion import build_fusion

METRICS = ("heldout_loss", "retrieval_top1", "matched_vs_shuffled")


@dataclass
class AlignVariant:
    label: str
    fusion: str
    features: list[str]


def parse_variant(spec: str) -> AlignVariant:
    """``LABEL=FUSION:feat+feat`` (e.g. ``-ocr=dbfusion:davit+caption+grounding``) or a fusion YAML file."""
    if spec.endswith((".yaml", ".yml")):
        from fvl.config import read_yaml

        f = read_yaml(spec)["model"]["fusion"]
        return AlignVariant(Path(spec).stem, f["name"], list(f["features"]))
    label, _, rest = spec.partition("=")
    fusion, _, feats = rest.partition(":")
    if not label or not fusion or not feats:
        raise ValueError(f"variant {spec!r}: expected LABEL=FUSION:feature+feature or a fusion YAML")
    return AlignVariant(label, fusion, feats.split("+"))


# ---- training and scoring --------------------------------------------------------------------------------------


@dataclass
class AlignRun:
    """One variant trained with one seed: its training-loss curve and its held-out scores."""

    variant: str
    seed: int
    trainable_params: int
    train_loss: list[float]
    heldout_loss: float
    retrieval_top1: float
    matched_vs_shuffled: float


@dataclass
class AlignResult:
    """All runs (variants x seeds) of one analysis, and the data they shared."""

    runs: list[AlignRun]
    pairs: int
    heldout_pairs: int
    batch_size: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(r.variant for r in self.runs))

    def of(self, variant: str) -> list[AlignRun]:
        return [r for r in self.runs if r.variant == variant]

    def table(self) -> list[dict[str, str | int | float]]:
        """Per variant: seeds, trainable parameters, and the mean and std (over seeds) of each held-out metric
        and of the final training loss (mean of the last 10 steps)."""
        rows = []
        for variant in self.variants:
            runs = self.of(variant)
            row: dict[str, str | int | float] = {
                "variant": variant,
                "seeds": len(runs),
                "trainable_params": runs[0].trainable_params,
            }
            values_of = {m: [getattr(r, m) for r in runs] for m in METRICS}
            values_of["train_loss"] = [statistics.fmean(r.train_loss[-10:]) for r in runs]
            for name, values in values_of.items():
                row[f"{name}_mean"] = statistics.fmean(values)
                row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
        return rows

    def mean_curves(self) -> dict[str, list[float]]:
        """The training loss per step, averaged over seeds."""
        return {
            v: [statistics.fmean(step) for step in zip(*(r.train_loss for r in self.of(v)), strict=True)]
            for v in self.variants
        }


def _seed(seed: int, purpose: str) -> int:
    """An independent stream per run seed and purpose (split, init, order, mismatch)."""
    return int.from_bytes(hashlib.sha256(f"fvl-align/{seed}/{purpose}".encode()).digest()[:8], "little") >> 1


def _generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, purpose))


class _Aligner(nn.Module):
    """A variant's fusion and projection: the fused tokens of some pairs -> unit vectors in the text space."""

    def __init__(self, variant: AlignVariant, feats: PairFeatures, hidden: int) -> None:
        super().__init__()
        self.names = list(variant.features)
        tokens = next(iter(feats.vision.values())).shape[1]
        dims = {n: feats.vision[n].shape[-1] for n in self.names}
        self.fusion = build_fusion(FusionConfig(variant.fusion, self.names), dims, tokens)
        self.proj = projection(self.fusion.output_dim, hidden, feats.text.shape[-1])

    def forward(self, feats: PairFeatures, idx: torch.Tensor) -> torch.Tensor:
        # Fused per batch (and moved to the device per batch): only one batch of fused tokens is in memory.
        device = next(self.proj.parameters()).device
        return pooled(self.proj, self.fusion({n: feats.vision[n][idx].to(device) for n in self.names}))


def _train(
    aligner: _Aligner, feats: PairFeatures, train: torch.Tensor, cfg: AlignConfig, seed: int
) -> list[float]:
    """Adam on random batches of the training pairs; the loss per step."""
    device = next(aligner.parameters()).device
    params = [p for p in aligner.parameters() if p.requires_grad]  # a learned fusion trains too
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order = _generator(seed, "order")
    curve = []
    for _ in range(cfg.steps):
        idx = train[torch.randperm(len(train), generator=order)[: cfg.batch_size]]
        loss = contrastive_loss(aligner(feats, idx), feats.text[idx].to(device), cfg.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def _run(
    variant: AlignVariant, feats: PairFeatures, cfg: AlignConfig, seed: int, device: torch.device
) -> AlignRun:
    train, held = split_pairs(len(feats), cfg.heldout, cfg.batch_size, _generator(seed, "split"))
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG alone
        torch.manual_seed(_seed(seed, "init"))
        aligner = _Aligner(variant, feats, cfg.hidden)
    curve = _train(aligner.to(device), feats, train, cfg, seed)
    with torch.no_grad():
        vision = torch.cat([aligner(feats, held[b]).cpu() for b in full_batches(len(held), cfg.batch_size)])
    text = feats.text[held]
    mismatch = derangement(len(held), _generator(seed, "mismatch"))
    return AlignRun(
        variant=variant.label,
        seed=seed,
        trainable_params=sum(p.numel() for p in aligner.parameters() if p.requires_grad),
        train_loss=curve,
        heldout_loss=heldout_loss(vision, text, cfg.temperature, cfg.batch_size),
        retrieval_top1=retrieval_top1(vision, text, cfg.batch_size),
        matched_vs_shuffled=matched_vs_shuffled(vision, text, mismatch),
    )


def alignment_analysis(
    model,
    variants: list[AlignVariant],
    cfg: AlignConfig | None = None,
    features: PairFeatures | None = None,
    device: torch.device | str | None = None,
) -> AlignResult:
    """Train and score each variant with each of ``cfg.seeds`` seeds (``cfg.seed``, ``cfg.seed + 1``, ...).
    ``features`` (from ``encode_pairs``) skips the feature pass, e.g. to reuse it across analyses; the model
    is then not needed. The projections train on ``device`` (default: the model's, else the CPU)."""
    cfg = cfg or AlignConfig()
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"align: variant labels must differ, got {labels}")
    feats = features if features is not None else encode_pairs(model, cfg)
    if device is None:
        device = next(model.parameters()).device if model is not None else "cpu"
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    runs = [_run(v, feats, cfg, s, torch.device(device)) for v in variants for s in seeds]
    held = heldout_size(len(feats), cfg.heldout, cfg.batch_size)
    return AlignResult(runs, len(feats), held, cfg.batch_size, dict(feats.skipped))
