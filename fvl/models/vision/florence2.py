"""Florence-2 as a feature extractor, on transformers' native implementation (no remote code).

Named features per image (the paper's depth and breadth):
- ``davit``: V, the projected DaViT tokens - the encoder's image input;
- one entry per prompt: V'_t, the image-token slice of the encoder's last hidden state under prompt t.

DaViT runs once per image; all prompts go through the encoder as one batch of ``B x P`` sequences laid out
exactly as Florence-2's processor lays them out (image tokens, ``<s>``, prompt, ``</s>``); the decoder is
not kept. Transformers prepends one mean-pooled token to the image tokens (577 at 768 px); it is dropped
unless ``keep_pooled_token`` (Florence-VL feeds 576).

Prompts shorter than the longest are right-padded. ``prompt_padding=masked`` (the default) masks the pads
out of attention; ``unmasked`` leaves them in and attended, which is what the authors' Florence-VL does (its
prompt ids are padded to the longest of its three prompts and fed without an attention mask): an imported
Florence-VL checkpoint needs it to give the features it was trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Model,
    Florence2VisionConfig,
)
from transformers.models.florence2.modeling_florence2 import Florence2VisionBlock

from fvl.assets.florence2_arch import davit_tokens, expand_prompt, random_init_config
from fvl.config.model import VisionConfig, plain_dict
from fvl.models.vision.base import DTYPES, VisionTower, require_local_dir


def _tokens(vision_config: Florence2VisionConfig, cfg: VisionConfig) -> int:
    return davit_tokens(vision_config, cfg.image_size) + int(cfg.keep_pooled_token)


@functools.lru_cache(maxsize=16)
def _folder_vision_config(path: str, mtime_ns: int) -> Florence2VisionConfig:
    """A folder's DaViT config, read once per version of its config.json (every config load asks for it,
    e.g. 48 times when a sweep checks its grid)."""
    return Florence2Config.from_pretrained(path).vision_config


class Florence2Tower(VisionTower):
    """DaViT + Florence-2's image projection + the multimodal encoder, returning named features."""

    @classmethod
    def tokens_for(cls, cfg: VisionConfig) -> int:
        if cfg.init == "pretrained":
            path = require_local_dir(cfg.path, "model.vision.path", "Florence-2 (transformers-native format)")
            config = Path(path) / "config.json"
            vision_config = _folder_vision_config(path, config.stat().st_mtime_ns if config.exists() else 0)
        else:
            vision_config = Florence2VisionConfig(**plain_dict(cfg.arch).get("vision_config", {}))
        return _tokens(vision_config, cfg)

    def wrap_classes(self) -> set[type[nn.Module]]:
        # DaViT's blocks and the encoder's layers: the repeated units, each of one dtype.
        return {Florence2VisionBlock} | {type(layer) for layer in self.encoder.layers}

    def compile_units(self) -> list[nn.Module]:
        # DaViT and the projection: ~85 % of the extraction, mostly memory-bound glue (copies, adds, norms,
        # GELU) that kernel fusion removes. The encoder stays eager: compiling it as well lost the gain on an
        # H100 (measured: DaViT alone compiled gave 3.8x the reference way, with the encoder too no gain).
        return [self.davit, self.image_projection]

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dtype = DTYPES[cfg.frozen_dtype]
        if cfg.init == "pretrained":
            path = require_local_dir(cfg.path, "model.vision.path", "Florence-2 (transformers-native format)")
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or path)
            model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=dtype).model
            config = model.config
        else:
            from fvl.assets.tiny_tokenizers import tiny_tokenizer_dirs

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or tiny_tokenizer_dirs()[1])
            config = random_init_config(plain_dict(cfg.arch), self.tokenizer)
            model = Florence2Model(config).to(dtype)

        self.config = config
        self.davit = model.vision_tower
        self.image_projection = model.multi_modal_projector
        self.encoder = model.language_model.encoder  # shares its token embedding with the (dropped) decoder
        spec = self.transform_for(cfg)
        self.image_size, self.image_mean, self.image_std = spec.size, spec.mean, spec.std
        self.keep_pooled_token = cfg.keep_pooled_token
        self.prompt_padding = cfg.prompt_padding
        self.prompt_names = [p.name for p in cfg.prompts]
        self.prompt_texts = [expand_prompt(p.text) for p in cfg.prompts]
        self._tokens = _tokens(config.vision_config, cfg)

        # Prompts tokenised once, as Florence-2's processor does: <s> text </s>, right-padded to one length.
        ids = [
            [
                self.tokenizer.bos_token_id,
                *self.tokenizer(t, add_special_tokens=False).input_ids,
                self.tokenizer.eos_token_id,
            ]
            for t in self.prompt_texts
        ]
        width = max((len(x) for x in ids), default=0)
        # Known here, so ``features`` decides on a mask without reading a device buffer (a sync on a GPU).
        self.prompt_padded = [len(x) < width for x in ids]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.register_buffer(
            "prompt_ids",
            torch.tensor([x + [pad] * (width - len(x)) for x in ids], dtype=torch.long).reshape(
                len(ids), width
            ),
            persistent=False,
        )
        self.register_buffer(
            "prompt_mask",
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.long).reshape(
                len(ids), width
            ),
            persistent=False,
        )
        max_pos = config.text_config.max_position_embeddings
        if self._tokens + 1 + width > max_pos:
            raise ValueError(
                f"Florence-2 encoder takes {max_pos} positions but image ({self._tokens}) + prompt ({width}) "
                f"tokens need more: lower model.vision.image_size or raise text_config.max_position_embeddings"
            )

    @property
    def feature_names(self) -> list[str]:
        return ["davit", *self.prompt_names]

    def feature_dim(self, name: str) -> int:
        self.check_names([name])
        return self.config.vision_config.projection_dim

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """V with the pooled token first, ``[B, 1 + N, D]``: DaViT -> projection + LayerNorm + positions."""
        return self.image_projection(self.davit(pixel_values).last_hidden_state)

    def features(
        self, pixel_values: torch.Tensor, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        self.check_pixels(pixel_values)
        names = self.check_names(names)
        image = self.image_tokens(pixel_values)
        start = 0 if self.keep_pooled_token else 1
        out: dict[str, torch.Tensor] = {}
        if "davit" in names:
            out["davit"] = image[:, start:]
        wanted = [i for i, n in enumerate(self.prompt_names) if n in names]
        if wanted:
            batch, n_img, dim = image.shape
            n_prompts = len(wanted)
            prompt_ids, prompt_mask = self.prompt_ids[wanted], self.prompt_mask[wanted]
            text = self.encoder.embed_tokens(prompt_ids).to(image.dtype)  # [P, L, D]
            embeds = torch.cat(
                [
                    image.unsqueeze(1).expand(-1, n_prompts, -1, -1),
                    text.unsqueeze(0).expand(batch, -1, -1, -1),
                ],
                dim=2,
            ).reshape(batch * n_prompts, n_img + text.shape[1], dim)
            mask = None  # ``unmasked``: pads attended, as Florence-VL feeds its padded prompts
            masked = self.prompt_padding == "masked"
            if masked and any(self.prompt_padded[i] for i in wanted):  # a mask only when needed (fast SDPA)
                img_mask = prompt_mask.new_ones(n_prompts, n_img)
                mask = _additive(torch.cat([img_mask, prompt_mask], dim=1).repeat(batch, 1), embeds.dtype)
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            hidden = hidden[:, start:n_img].reshape(batch, n_prompts, n_img - start, dim)
            for j, i in enumerate(wanted):
                out[self.prompt_names[i]] = hidden[:, j]
        return {n: out[n] for n in names}

    def unused_parameters(self, names: Sequence[str]) -> set[str]:
        if any(n in self.prompt_names for n in self.check_names(names)):
            return set()
        return {f"encoder.{n}" for n, _ in self.encoder.named_parameters()}

    def florence_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under transformers' Florence2ForConditionalGeneration key names (decoder excluded)."""
        sd: dict[str, torch.Tensor] = {}
        for prefix, module in (
            ("model.vision_tower.", self.davit),
            ("model.multi_modal_projector.", self.image_projection),
            ("model.language_model.encoder.", self.encoder),
        ):
            for k, v in module.state_dict().items():
                sd[prefix + k] = v.detach().contiguous().cpu()
        sd["model.language_model.shared.weight"] = sd[
            "model.language_model.encoder.embed_tokens.weight"
        ].clone()
        return sd

    def save_pretrained(self, out_dir: str | Path) -> None:
        """A Florence-2 folder: DaViT, projection and encoder trained by fvl; the decoder, which Florence-VL
        never runs, is absent and initialises randomly if transformers loads the folder (it warns)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        sd = self.florence_state_dict()
        sd.pop("model.language_model.encoder.embed_tokens.weight")  # tied to shared; one copy on disk
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(out)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[B, L]`` keep-mask as the ``[B, 1, 1, L]`` additive mask that eager and SDPA attention take as it
    is. Given the 2D mask, transformers would read it back to the host (``mask.all()``) on every call: one
    sync per step for nothing, since which prompts are padded is known when the tower is built."""
    out = torch.zeros(keep.shape[0], 1, 1, keep.shape[1], dtype=dtype, device=keep.device)
    return out.masked_fill(~keep.bool()[:, None, None, :], torch.finfo(dtype).min)
