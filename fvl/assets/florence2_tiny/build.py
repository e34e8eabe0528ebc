"""Stage 0: the tiny preset's Florence-2 trained as the real one was, on its own tasks.

transformers' native ``Florence2ForConditionalGeneration`` (DaViT, the multimodal encoder and its decoder)
learns ``<DETAILED_CAPTION>``, ``<OCR>`` and ``<DENSE_REGION_CAPTION>`` on synthetic pictures, each example
one task of one picture, laid out as Florence-2's processor lays it out (image placeholders, ``<s>``, the
task's prompt text, ``</s>``; the target is decoded after ``</s>``). Its encoder then reads the picture
differently under each prompt: the breadth the paper fuses. The result is saved as a transformers-native
folder (config, weights, tokenizer with the 1000 location tokens, ``preprocessor_config.json``), which the
tiny preset loads through ``model.vision.path`` exactly as it would load a downloaded Florence-2-large.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from fvl.assets.florence2_arch import TASK_PROMPTS, random_init_config
from fvl.assets.florence2_tiny.config import Florence2TinyConfig, tiny_arch
from fvl.assets.florence2_tiny.tasks import TASKS, iou, loc_tokens, parse_regions, targets
from fvl.inputs.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from fvl.synthetic import generate

log = logging.getLogger(__name__)


def tokenizer_with_locations():
    """The tiny Florence-2 tokenizer plus Florence-2's 1000 location tokens (kept by decoding)."""
    from transformers import AutoTokenizer

    from fvl.assets.tiny_tokenizers import tiny_tokenizer_dirs

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dirs()[1])
    tok.add_tokens(loc_tokens())
    return tok


class TaskBatches:
    """Pictures drawn once as uint8 tensors with every task's target ids; batches of (picture, task)."""

    def __init__(self, tok, transform: ImageTransform, n: int, split: str, size: int) -> None:
        self.tok, self.transform = tok, transform
        samples = [generate(i, split, 0, size) for i in range(n)]
        self.samples = samples
        self.pixels = torch.stack([transform(s.image) for s in samples])  # uint8: 12 KB a picture at 64 px
        self.prompt_ids = {t: tok(TASK_PROMPTS[t], add_special_tokens=False).input_ids for t in TASKS}
        self.targets = [
            {t: tok(text, add_special_tokens=False).input_ids for t, text in targets(s, size).items()}
            for s in samples
        ]

    def batch(self, picks: list[tuple[int, str]], image_token: int, n_img: int) -> dict[str, torch.Tensor]:
        """Inputs as Florence-2's processor makes them, labels ``target </s>`` padded with -100."""
        tok = self.tok
        rows = [
            [image_token] * n_img + [tok.bos_token_id, *self.prompt_ids[t], tok.eos_token_id]
            for _, t in picks
        ]
        labels = [[*self.targets[i][t], tok.eos_token_id] for i, t in picks]
        width, lwidth = max(map(len, rows)), max(map(len, labels))
        return {
            "input_ids": torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "pixel_values": self.transform.normalize(self.pixels[[i for i, _ in picks]]),
            "labels": torch.tensor([x + [-100] * (lwidth - len(x)) for x in labels]),
        }


def _lr_factor(step: int, cfg: Florence2TinyConfig) -> float:
    """The schedule, as a factor of each group's peak: linear warm-up over 5 % of the steps, cosine decay."""
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def train(cfg: Florence2TinyConfig, progress: bool = True):
    """The trained model, its tokenizer and the training losses."""
    from rich.progress import Progress
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(cfg.seed)
    tok = tokenizer_with_locations()
    model = Florence2ForConditionalGeneration(random_init_config(tiny_arch(), tok)).train()
    transform = ImageTransform(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
    data = TaskBatches(tok, transform, cfg.samples, "train", cfg.image_size)
    n_img = _image_tokens(model, data)
    model.model.vision_tower.requires_grad_(cfg.davit_lr > 0)  # frozen DaViT: no backward through it
    # A frozen DaViT gives each picture the same states at every step: run it once per picture, not once
    # per example (a third of a step at the defaults; measured 33 of 91 ms).
    davit_states = frozen_davit_states(model, data) if cfg.davit_lr == 0 else None
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.01)
    rng = random.Random(cfg.seed)
    losses = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("florence2-tiny", total=cfg.steps)
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * _lr_factor(step, cfg)
            picks = [(rng.randrange(cfg.samples), rng.choice(TASKS)) for _ in range(cfg.batch_size)]
            batch = data.batch(picks, model.config.image_token_id, n_img)
            if davit_states is not None:
                batch["davit_states"] = davit_states[[i for i, _ in picks]]
            loss = step_loss(model, batch, cfg.decoder_reads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            losses.append(loss.item())
            bar.advance(task)
    return model.eval(), tok, losses


@torch.no_grad()
def frozen_davit_states(model, data: TaskBatches, chunk: int = 256) -> torch.Tensor:
    """DaViT's output for every picture (before Florence-2's trainable projector), computed once."""
    tower = model.model.vision_tower
    return torch.cat([
        tower(data.transform.normalize(data.pixels[k : k + chunk])).last_hidden_state
        for k in range(0, len(data.pixels), chunk)
    ])  # fmt: skip


def param_groups(model, cfg: Florence2TinyConfig) -> list[dict[str, Any]]:
    """AdamW's groups: DaViT (``vision_tower``) at ``davit_lr`` (left out when 0: frozen), the rest at ``lr``."""
    davit = list(model.model.vision_tower.parameters())
    ids = {id(p) for p in davit}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "peak_lr": cfg.lr}]
    if cfg.davit_lr > 0:
        groups.append({"params": davit, "peak_lr": cfg.davit_lr})
    return groups


def encode(model, batch: dict[str, torch.Tensor]):
    """The encoder's outputs for a batch: Florence-2's own merge of image features into the placeholders,
    then its multimodal encoder over image tokens and prompt (what ``Florence2Model.forward`` does). The
    batch's ``davit_states``, when present, stand in for running DaViT on its pixels."""
    inner = model.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    if "davit_states" in batch:  # DaViT frozen and run once per picture (``frozen_davit_states``)
        image = inner.multi_modal_projector(batch["davit_states"]).to(embeds.dtype)
    else:
        image = inner.get_image_features(batch["pixel_values"]).pooler_output.to(embeds.dtype)
    mask = inner.get_placeholder_mask(batch["input_ids"], inputs_embeds=embeds, image_features=image)
    embeds = embeds.masked_scatter(mask, image)
    return inner.language_model.encoder(attention_mask=batch["attention_mask"], inputs_embeds=embeds)


def decoder_mask(model, batch: dict[str, torch.Tensor], reads: str) -> torch.Tensor:
    """What the decoder may attend to: every encoder position (``all``, Florence-2's own layout) or the
    image tokens alone (``image``): then the task's answer can only come through the image tokens, so the
    encoder must write each prompt's reading of the picture into them, and those states are exactly what
    Florence-VL fuses. A deep encoder does this by itself; a one-layer one lets the decoder read the prompt
    directly and leaves the image tokens nearly prompt-independent (measured: ``prompt_spread``)."""
    if reads == "all":
        return batch["attention_mask"]
    return (batch["input_ids"] == model.config.image_token_id).long()


def step_loss(model, batch: dict[str, torch.Tensor], reads: str) -> torch.Tensor:
    enc = encode(model, batch)
    return model(
        encoder_outputs=enc, attention_mask=decoder_mask(model, batch, reads), labels=batch["labels"]
    ).loss


def _image_tokens(model, data: TaskBatches) -> int:
    with torch.no_grad():
        px = data.transform.normalize(data.pixels[:1])
        return model.model.get_image_features(px).pooler_output.shape[1]


@torch.no_grad()
def evaluate(model, tok, cfg: Florence2TinyConfig) -> dict[str, float]:
    """Task metrics on validation pictures: the caption loss (per target token), OCR exact match on the
    pictures with text, for dense region captions the mean best IoU of each true box and the share of true
    objects whose description is predicted with a box of IoU >= 0.5, and ``prompt_spread``."""
    transform = ImageTransform(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
    data = TaskBatches(tok, transform, cfg.eval_samples, "val", cfg.image_size)
    n_img = _image_tokens(model, data)
    image_token = model.config.image_token_id
    everyone = list(range(cfg.eval_samples))
    reads = cfg.decoder_reads
    caption_loss = step_loss(
        model, data.batch([(i, "<DETAILED_CAPTION>") for i in everyone], image_token, n_img), reads
    )
    states = [
        encode(model, data.batch([(i, t) for i in everyone], image_token, n_img)).last_hidden_state[
            :, 1:n_img
        ]
        for t in TASKS
    ]
    # the caption loss hides what matters (most caption tokens are the template): does the caption of a
    # single-shape picture name its colour and its shape?
    single = [i for i in everyone if data.samples[i].kind in ("colour", "shape")]
    captions = _generate(model, tok, data, [(i, "<DETAILED_CAPTION>") for i in single], reads, 24)
    named = [data.samples[i].regions[0][0].split() for i in single]  # [colour, shape]
    colour_right = [c in text.lower().split() for (c, _), text in zip(named, captions, strict=True)]
    shape_right = [
        sh in text.lower().rstrip(".").split() for (_, sh), text in zip(named, captions, strict=True)
    ]
    with_text = [i for i in everyone if data.samples[i].text]
    ocr = _generate(model, tok, data, [(i, "<OCR>") for i in with_text], reads, 16)
    exact = [p.strip() == data.samples[i].text for i, p in zip(with_text, ocr, strict=True)]
    words = [e for i, e in zip(with_text, exact, strict=True) if data.samples[i].kind == "ocr"]
    regions = _generate(model, tok, data, [(i, "<DENSE_REGION_CAPTION>") for i in everyone], reads, 48)
    best, found = [], []
    for i, text in zip(everyone, regions, strict=True):
        predicted = parse_regions(text, cfg.image_size)
        for label, box in data.samples[i].regions:
            best.append(max((iou(box, b) for _, b in predicted), default=0.0))
            found.append(any(lab == label and iou(box, b) >= 0.5 for lab, b in predicted))
    return {
        "prompt_spread": prompt_spread(states),
        "caption_loss": float(caption_loss),
        "caption_colour_right": sum(colour_right) / max(1, len(colour_right)),
        "caption_shape_right": sum(shape_right) / max(1, len(shape_right)),
        "caption_pictures": float(len(single)),
        "ocr_exact_match": sum(exact) / max(1, len(exact)),
        "ocr_questions": float(len(exact)),
        "ocr_words_exact_match": sum(words) / max(1, len(words)),  # the drawn words (charts: "A B C")
        "ocr_word_questions": float(len(words)),
        "box_mean_iou": sum(best) / max(1, len(best)),
        "region_found_at_iou_0.5": sum(found) / max(1, len(found)),
        "regions": float(len(best)),
    }


def prompt_spread(features: list[torch.Tensor]) -> float:
    """How differently the encoder reads the same pictures under different prompts: the mean absolute
    difference of the image tokens' encoder states between each pair of prompts, relative to their mean
    absolute value (0: the prompts change nothing, so fusing them adds no breadth)."""
    scale = torch.stack([f.abs().mean() for f in features]).mean()
    pairs = [(a - b).abs().mean() for k, a in enumerate(features) for b in features[k + 1 :]]
    return float(torch.stack(pairs).mean() / scale)


def _generate(model, tok, data: TaskBatches, picks, reads: str, max_new_tokens: int) -> list[str]:
    """Greedy answers, decoding against the encoder positions the decoder was trained to read."""
    image_token, n_img = model.config.image_token_id, _image_tokens(model, data)
    eos, out = tok.eos_token_id, []
    for start in range(0, len(picks), 64):
        batch = data.batch(picks[start : start + 64], image_token, n_img)
        enc, mask = encode(model, batch), decoder_mask(model, batch, reads)
        ids = torch.full((len(batch["input_ids"]), 1), model.config.text_config.decoder_start_token_id)
        for _ in range(max_new_tokens):
            logits = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            if (ids[:, 1:] == eos).any(dim=1).all():
                break
        for row in ids[:, 1:].tolist():
            out.append(tok.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True))
    return out


def save(model, tok, cfg: Florence2TinyConfig, metrics: dict[str, Any], out: str | Path) -> Path:
    """A transformers-native Florence-2 folder, with how it was made in ``fvl_build.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_normalize": True,
        "size": {"height": cfg.image_size, "width": cfg.image_size}, "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD), "do_rescale": True, "rescale_factor": 1 / 255,
    }, indent=1))  # fmt: skip
    (out / "fvl_build.json").write_text(json.dumps({"config": cfg.key(), "metrics": metrics}, indent=1))
    return out


def build(cfg: Florence2TinyConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and save; returns the metrics (with the losses' first and last tenth, and seconds)."""
    began = time.perf_counter()
    model, tok, losses = train(cfg, progress)
    tenth = max(1, len(losses) // 10)
    metrics = {
        **evaluate(model, tok, cfg),
        "train_loss_first": sum(losses[:tenth]) / tenth,
        "train_loss_last": sum(losses[-tenth:]) / tenth,
        "seconds": round(time.perf_counter() - began, 1),
    }
    save(model, tok, cfg, metrics, out)
    log.info("florence2-tiny: %s", metrics)
    return metrics
