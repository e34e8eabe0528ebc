"""The composed model: vision tower -> fusion -> projector -> causal LM.

Images enter the text as placeholder ids (the tokenizer's image token, expanded by the chat template to
``num_image_tokens`` ids per image). ``embed`` checks that the placeholder count equals images x tokens
and then scatters the projected features into the LLM's input embeddings in order (row-major over the
batch), so several images per sample and text-only samples need no special path.

Module names are the checkpoint key prefixes: ``vision.*`` (the main tower), ``towers.<key>.*`` (more towers
beside it, ``model.vision.towers``), ``fusion.*``, ``projector.*``, ``llm.*``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from fvl.config.model import COMPONENTS, ModelConfig
from fvl.inputs.processor import Processor
from fvl.models.fusion import build_fusion
from fvl.models.llm import build_llm
from fvl.models.loss import causal_lm_loss
from fvl.models.projector import build_projector
from fvl.models.vision import VisionTower, build_vision_tower, decode_transform
from fvl.models.vision.towers import align_grid, by_tower, canonical, tower_input
from fvl.text import get_template
from fvl.text.templates import TemplateError


class ImageTokenMismatch(ValueError):
    """The input ids hold a different number of image placeholders than the images supplied need."""


ImageInput = Image.Image | bytes | torch.Tensor | None


class FlorenceVL(nn.Module):
    """A Florence-VL model built from a ``ModelConfig`` (see ``fvl.models.build_model``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision, _ = build_vision_tower(cfg.vision)
        used = cfg.vision.in_use(list(cfg.fusion.features))
        self.towers = nn.ModuleDict(
            {key: build_vision_tower(t)[0] for key, t in used.items() if key != cfg.vision.name}
        )
        names = [canonical(cfg.vision, n) for n in cfg.fusion.features]
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise KeyError(f"unknown vision feature(s) {unknown}; the towers have {self.feature_names}")
        self.fusion = build_fusion(
            dataclasses.replace(cfg.fusion, features=names),
            {n: self.feature_dim(n) for n in names},
            self.vision.num_tokens,
        )
        transform = decode_transform(cfg.vision, names)
        self.llm, self.tokenizer = build_llm(cfg.llm, cfg.text)
        self.template = get_template(cfg.text.template)
        d_llm = self.llm.get_input_embeddings().embedding_dim
        self.projector = build_projector(cfg.projector, self.fusion.output_dim, d_llm)
        self.image_token_id: int = self.tokenizer.image_token_id
        # What the data side needs, equal to ``build_processor(cfg)`` (which builds no model).
        self.processor = Processor(
            self.tokenizer,
            self.template,
            transform,
            self.num_image_tokens,
            cfg.text.max_length,
            cfg.text.min_text_tokens,
        )

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image after fusion (576 for DBFusion at 768 px, k x 576 for token concat)."""
        return self.fusion.output_tokens

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    # ---- towers ------------------------------------------------------------------------------------------
    def all_towers(self) -> dict[str, VisionTower]:
        """Every tower by its name: the main one (``model.vision.name``) first, then ``model.vision.towers``."""
        return {self.cfg.vision.name: self.vision, **dict(self.towers.items())}

    def tower_prefix(self, key: str) -> str:
        """A tower's key prefix in the state dict: ``vision.`` for the main one, ``towers.<key>.`` beside it."""
        return "vision." if key == self.cfg.vision.name else f"towers.{key}."

    @property
    def feature_names(self) -> list[str]:
        """Every feature the towers can make, in their canonical spelling (``fvl.models.vision.towers``)."""
        main, names = self.cfg.vision.name, []
        for key, tower in self.all_towers().items():
            names += [n if key == main else f"{key}.{n}" for n in tower.feature_names]
        return names

    def feature_dim(self, name: str) -> int:
        """Channel width of a feature (either spelling); an unknown name is a KeyError listing the known."""
        groups = by_tower(self.cfg.vision, [name])
        ((key, [(_, own)]),) = groups.items()
        tower = self.all_towers()[key]
        if own not in tower.feature_names:
            raise KeyError(f"unknown vision feature {name!r}; the towers have {self.feature_names}")
        return tower.feature_dim(own)

    def tower_features(
        self, pixels: torch.Tensor, names: list[str], aligned: bool = True
    ) -> dict[str, torch.Tensor]:
        """The features ``names`` of the shared decode ``pixels`` (``uint8``, or normalised floats), each
        tower given its own input and run once; every feature on the main tower's grid (``aligned=False``:
        each on its own tower's grid, as PCA shows them)."""
        towers, main = self.all_towers(), self.processor.transform
        out: dict[str, torch.Tensor] = {}
        for key, wanted in by_tower(self.cfg.vision, names).items():
            tower = towers[key]
            dtype = next(p.dtype for p in tower.parameters() if p.is_floating_point())
            x = tower_input(pixels, main, tower.transform()).to(dtype)
            got = tower.features(x, [own for _, own in wanted])
            for name, own in wanted:
                feature = got[own]
                out[name] = (
                    align_grid(feature, self.vision.num_tokens, self.cfg.vision.grid_resampling)
                    if aligned
                    else feature
                )
        return out

    # ---- vision -> LLM embeddings --------------------------------------------------------------------------
    def vision_trainable(self) -> bool:
        return any(p.requires_grad for t in self.all_towers().values() for p in t.parameters())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, num_image_tokens, d_llm]``: ``project(fuse_images(pixel_values))``."""
        return self.project(self.fuse_images(pixel_values))

    def fuse_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> the fused features ``[B, num_image_tokens, fusion.output_dim]`` (what a feature
        cache stores). ``uint8`` images (what the processor makes) are normalised here, on their device, in
        float32 and then cast to the tower's dtype; float pixels are taken as already normalised. The tower
        runs without autograd only when none of its parameters train (a frozen tower), never when a stage
        trains it. Each tower gets its own input from the one decode (``tower_features``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trainable()):
            features = self.tower_features(pixel_values, self.fusion.names)
        return self.fusion(features)

    def project(self, fused: torch.Tensor) -> torch.Tensor:
        """Fused features (computed now, or read from a feature cache) -> LLM embeddings."""
        first = next(self.projector.parameters())
        return self.projector(fused.to(first.dtype))

    def features_frozen(self) -> bool:
        """Whether the fused features are a fixed function of the image in this stage (tower and fusion
        train nothing): the condition for a feature cache, and for skipping the tower on a blank image."""
        return not any(
            p.requires_grad for m in (self.vision, self.towers, self.fusion) for p in m.parameters()
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        placeholders: int | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings with image features merged at the placeholder positions. The images come as
        ``pixel_values`` or, from a feature cache, as their fused features ``image_features`` ``[N,
        num_image_tokens, fusion.output_dim]``. ``placeholders``: the placeholder count when the caller
        counted it on the host (the data loader does, before the batch moves), which spares a device-to-host
        sync per step; else it is counted here."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        images = image_features if image_features is not None and len(image_features) else pixel_values
        n_images = 0 if images is None else int(images.shape[0])
        n_placeholders = int(mask.sum()) if placeholders is None else int(placeholders)
        if n_placeholders != n_images * self.num_image_tokens:
            raise ImageTokenMismatch(
                f"{n_placeholders} image placeholder tokens in the batch but {n_images} image(s) x "
                f"{self.num_image_tokens} tokens = {n_images * self.num_image_tokens} features: tokenise "
                "prompts with the model's template (each image placeholder is expanded to num_image_tokens)"
            )
        if n_images:
            if images is image_features:
                image_embeds = self.project(image_features)
            else:
                image_embeds = self.encode_images(pixel_values)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))
        elif self.training and torch.is_grad_enabled() and self._image_path_trains():
            # A text-only micro batch still runs the image path, on one blank image weighted by zero (as
            # LLaVA does): every rank then has the same graph, so DDP finds no unused parameters and FSDP's
            # collectives stay in step. The loss is unchanged; the image path's gradients are zeros. Batches
            # from a feature cache (``image_features`` present, maybe empty) never run the tower on any rank,
            # so there the projector runs alone, on zero features.
            if image_features is not None:
                blank = self.project(embeds.new_zeros(1, self.num_image_tokens, self.fusion.output_dim))
            else:
                size = self.processor.transform.size
                blank = self.encode_images(embeds.new_zeros(1, 3, size, size, dtype=torch.float32))
            embeds = embeds + 0.0 * blank.to(embeds.dtype).sum()
        return embeds

    def _image_path_trains(self) -> bool:
        return any(
            p.requires_grad
            for m in (self.vision, self.towers, self.fusion, self.projector)
            for p in m.parameters()
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> CausalLMOutputWithPast:
        """Training forward: ``batch`` holds ``input_ids``, ``attention_mask``, ``labels`` and optionally
        ``pixel_values`` (all images of the batch, in placeholder order; ``uint8`` or normalised float) or their
        fused features ``image_features`` (from a feature cache, ``fvl.data.feature_cache.store``), and
        ``position_ids`` (packed batches: they restart at each sample), ``num_items_in_batch`` (the loss is
        then the sum over supervised tokens divided by it: a whole step's count). Returns the LLM output;
        ``.loss`` is otherwise the mean over supervised tokens, computed as ``model.llm.loss`` says (``fvl.models.loss``): with
        ``chunked`` or ``fused`` the full logits are never built and ``.logits`` is None."""
        embeds = self.embed(
            batch["input_ids"],
            batch.get("pixel_values"),
            batch.get("num_placeholders"),
            image_features=batch.get("image_features"),
        )
        return causal_lm_loss(
            self.llm,
            embeds,
            batch.get("attention_mask"),
            batch.get("labels"),
            position_ids=batch.get("position_ids"),
            mode=self.cfg.llm.loss,
            num_items_in_batch=batch.get("num_items_in_batch"),
        )

    # ---- inference -----------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image | bytes], mode: str = "pad") -> torch.Tensor:
        """PIL images or encoded bytes -> ``uint8 [N, 3, S, S]`` at the tower's resolution (``encode_images``
        normalises them)."""
        if not images:
            size = self.processor.transform.size
            return torch.empty(0, 3, size, size, dtype=torch.uint8)
        processor = self.processor.with_resize_mode(mode)
        return torch.stack([processor.image(im) for im in images])

    def _stack_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """One batch of images: uint8 stays uint8 (normalised on the device); a mix with normalised floats
        is normalised here, since a stack needs one dtype."""
        if all(p.dtype == torch.uint8 for p in pixels):
            return torch.stack(pixels)
        return torch.stack([self.processor.transform.normalize(p) for p in pixels])

    def fsdp_wrap_classes(self) -> set[type[nn.Module]]:
        """The repeated blocks of the towers and the LLM: FSDP wrap units (and checkpointing units)."""
        llm_layers = set(getattr(self.llm, "_no_split_modules", None) or [])
        towers = set().union(*(t.wrap_classes() for t in self.all_towers().values()))
        return towers | {type(m) for m in self.llm.modules() if type(m).__name__ in llm_layers}

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageInput | Sequence[ImageInput]] | torch.Tensor | None,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        resize_mode: str = "pad",
        **generate_kwargs,
    ) -> list[str]:
        """Greedy answers (KV cache on) for a batch of prompts, each with zero, one or several images.

        ``images[i]`` is a PIL image, encoded image bytes, a preprocessed ``[3, S, S]`` tensor (``uint8``, or
        normalised float), ``None`` (text-only) or a list of those. A prompt without the image placeholder
        gets one ``<image>\\n`` per image in front."""
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts")
        device = next(self.llm.parameters()).device
        token = self.tokenizer.image_token
        rows, pixels = [], []
        for item, prompt in zip(images, prompts, strict=True):
            group = [] if item is None else list(item) if isinstance(item, (list, tuple)) else [item]
            if token not in prompt and group:
                prompt = f"{token}\n" * len(group) + prompt
            if prompt.count(token) != len(group):
                raise TemplateError(
                    f"prompt has {prompt.count(token)} image placeholders for {len(group)} images"
                )
            rows.append(self.template.prompt(prompt, self.tokenizer, self.num_image_tokens).input_ids)
            for im in group:
                pixels.append(im if isinstance(im, torch.Tensor) else self.preprocess([im], resize_mode)[0])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left padding
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        pixel_values = self._stack_pixels(pixels).to(device) if pixels else None
        embeds = self.embed(input_ids, pixel_values)
        generate_kwargs.setdefault("do_sample", False)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.template.stop_token_ids(self.tokenizer),
            pad_token_id=pad,
            use_cache=True,
            **generate_kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ---- training mode -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FlorenceVL:
        """Components with nothing to train stay in eval mode (no dropout / drop-path in a frozen tower)."""
        super().train(mode)
        if mode:
            parts = [getattr(self, name) for name in COMPONENTS] + list(self.towers.values())
            for part in parts:
                params = list(part.parameters())
                if params and not any(p.requires_grad for p in params):
                    part.eval()
        return self
