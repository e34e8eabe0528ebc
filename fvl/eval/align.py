"""The paper's vision-language alignment analysis (section 4, Figs. 4-5), as ``fvl align``.

With the vision tower and the LLM frozen, only a linear projection P of the fused vision features is
trained on image-caption pairs: f_v = normalise(mean_tokens(P(fused features))), f_t = normalise(mean over
the caption's tokens of the LLM's last hidden layer); the loss is the cross-entropy of
softmax(f_v f_t^T / temperature) against the matching pairs. A lower loss means features that align better
with the LLM's text space. The paper writes the softmax without a temperature; with unit vectors the logits
lie in [-1, 1] and the loss barely moves from log N, so a CLIP-style fixed temperature (default 0.07) is
applied. Each variant is a fusion (name + feature subset) over the same frozen tower; vision and text
features are computed once and cached, so comparing many variants is cheap.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fvl.data.synthetic import generate
from fvl.eval.config import AlignConfig
from fvl.models.config import FusionConfig
from fvl.models.fusion import build_fusion


@dataclass
class AlignVariant:
    label: str
    fusion: str
    features: list[str]


def parse_variant(spec: str) -> AlignVariant:
    """``LABEL=FUSION:feat+feat`` (e.g. ``-ocr=dbfusion:davit+caption+grounding``) or a fusion YAML file."""
    if spec.endswith((".yaml", ".yml")):
        from omegaconf import OmegaConf

        f = OmegaConf.load(spec).model.fusion
        return AlignVariant(Path(spec).stem, f.name, list(f.features))
    label, _, rest = spec.partition("=")
    fusion, _, feats = rest.partition(":")
    if not label or not fusion or not feats:
        raise ValueError(f"variant {spec!r}: expected LABEL=FUSION:feature+feature or a fusion YAML")
    return AlignVariant(label, fusion, feats.split("+"))


@torch.no_grad()
def _features(model, n: int, seed: int, batch: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All named vision features of ``n`` synthetic caption images and the LLM caption embeddings."""
    v = model.vision
    transform = v.transform("square")
    vision: dict[str, list[torch.Tensor]] = {}
    text: list[torch.Tensor] = []
    tok = model.tokenizer
    for start in range(0, n, batch):
        samples = [generate(i, "train", seed) for i in range(start, min(n, start + batch))]
        px = transform.normalize(torch.stack([transform(s.image) for s in samples]))  # the tower takes floats
        for name, feat in v.features(px).items():
            vision.setdefault(name, []).append(feat.float())
        enc = tok([s.caption for s in samples], add_special_tokens=False, padding=True, return_tensors="pt")
        hidden = model.llm(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        mask = enc.attention_mask.unsqueeze(-1).float()
        text.append(nn.functional.normalize((hidden.float() * mask).sum(1) / mask.sum(1), dim=-1))
    return {k: torch.cat(v) for k, v in vision.items()}, torch.cat(text)


def alignment_curves(
    model, variants: list[AlignVariant], cfg: AlignConfig | None = None
) -> dict[str, list[float]]:
    """Loss per step for each variant (same data, same order, same init seed)."""
    cfg = cfg or AlignConfig()
    steps, batch_size, lr, temperature, seed = cfg.steps, cfg.batch_size, cfg.lr, cfg.temperature, cfg.seed
    vision, text = _features(model.eval(), cfg.samples, seed)
    curves = {}
    for variant in variants:
        fusion = build_fusion(
            FusionConfig(variant.fusion, variant.features),
            {n: vision[n].shape[-1] for n in variant.features},
            model.vision.num_tokens,
        )
        fused = fusion({n: vision[n] for n in variant.features})
        g = torch.Generator().manual_seed(seed)
        proj = nn.Linear(fused.shape[-1], text.shape[-1])
        with torch.no_grad():
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) / fused.shape[-1] ** 0.5)
            proj.bias.zero_()
        opt = torch.optim.Adam(proj.parameters(), lr=lr)
        order = torch.Generator().manual_seed(seed + 1)
        losses = []
        for _ in range(steps):
            idx = torch.randperm(len(text), generator=order)[:batch_size]
            fv = nn.functional.normalize(proj(fused[idx]).mean(1), dim=-1)
            logits = fv @ text[idx].T / temperature
            loss = nn.functional.cross_entropy(logits, torch.arange(len(idx)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        curves[variant.label] = losses
    return curves


def write_curves(curves: dict[str, list[float]], out_dir: str | Path, smooth: int = 10) -> tuple[Path, Path]:
    """``align.csv`` (step, variant, loss) and ``align.png`` (the curves side by side, smoothed)."""
    from fvl.extras import pyplot

    plt = pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "align.csv", out / "align.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "variant", "loss"])
        for label, losses in curves.items():
            w.writerows([i, label, f"{v:.6f}"] for i, v in enumerate(losses))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, losses in curves.items():
        t = torch.tensor(losses)
        k = max(1, min(smooth, len(losses)))
        smoothed = (
            torch.nn.functional.avg_pool1d(t[None, None], k, stride=1).flatten() if len(losses) >= k else t
        )
        ax.plot(range(k - 1, k - 1 + len(smoothed)), smoothed.tolist(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("alignment loss")
    ax.set_title("Vision-language alignment (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path
