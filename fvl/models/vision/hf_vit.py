"""CLIP and SigLIP vision towers (transformers' CLIPVisionModel / SiglipVisionModel), features from chosen
layers: the LLaVA-1.5 baseline (layer -2, patch tokens) and multi-layer experiments."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from fvl.config.model import VisionConfig, check_arch_keys, plain_dict
from fvl.models.vision.base import DTYPES, VisionTower, require_local_dir

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFViTTower(VisionTower):
    """A ViT whose hidden states at ``cfg.layers`` become features ``layer_{i}`` (class token dropped)."""

    model_cls: type
    config_cls: type
    has_class_token: bool

    @classmethod
    def _config(cls, cfg: VisionConfig):
        if cfg.init == "pretrained":
            return cls.config_cls.from_pretrained(
                require_local_dir(cfg.path, "model.vision.path", cls.model_cls.__name__)
            )
        arch = {"image_size": cfg.image_size, **plain_dict(cfg.arch)}
        check_arch_keys(cls.config_cls, arch, "model.vision.arch")
        return cls.config_cls(**arch)

    @classmethod
    def tokens_for(cls, cfg: VisionConfig) -> int:
        config = cls._config(cfg)
        return (config.image_size // config.patch_size) ** 2

    @property
    def _inner(self) -> tuple[nn.Module, str]:
        """The transformer and its parameters' name prefix: transformers 5 puts embeddings and encoder on the
        vision model itself, older releases under ``vision_model``."""
        inner = getattr(self.model, "vision_model", None)
        return (inner, "vision_model.") if inner is not None else (self.model, "")

    def wrap_classes(self) -> set[type[nn.Module]]:
        return {type(layer) for layer in self._inner[0].encoder.layers}

    def compile_units(self) -> list[nn.Module]:
        return [self.model]  # the whole ViT: ``features`` only slices its hidden states

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        dtype = DTYPES[cfg.frozen_dtype]
        if cfg.init == "pretrained":
            path = require_local_dir(cfg.path, "model.vision.path", self.model_cls.__name__)
            self.model = self.model_cls.from_pretrained(path, dtype=dtype)
        else:
            self.model = self.model_cls(self._config(cfg)).to(dtype)
        config = self.model.config
        if config.image_size != cfg.image_size:
            raise ValueError(
                f"model.vision.image_size={cfg.image_size} but the tower was built for {config.image_size}"
            )
        spec = self.transform_for(cfg)
        self.image_size, self.image_mean, self.image_std = spec.size, spec.mean, spec.std
        n_layers = config.num_hidden_layers
        self.layers = list(cfg.layers)
        for i in self.layers:
            if not -(n_layers + 1) <= i <= n_layers:
                raise ValueError(
                    f"model.vision.layers: {i} out of range for {n_layers} layers (+ embeddings)"
                )
        # hidden_states has n_layers + 1 entries (embeddings first); normalise to that index space.
        self._index = {f"layer_{i}": i % (n_layers + 1) for i in self.layers}
        self._tokens = (config.image_size // config.patch_size) ** 2

    @property
    def feature_names(self) -> list[str]:
        return list(self._index)

    def feature_dim(self, name: str) -> int:
        self.check_names([name])
        return self.model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def features(
        self, pixel_values: torch.Tensor, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        self.check_pixels(pixel_values)
        names = self.check_names(names)
        pixel_values = pixel_values.to(self.model.dtype)
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        start = 1 if self.has_class_token else 0
        return {n: hidden[self._index[n]][:, start:] for n in names}

    def unused_parameters(self, names: Sequence[str]) -> set[str]:
        deepest = max(self._index[n] for n in self.check_names(names))
        prefix = self._inner[1]
        unused = set()
        for n, _ in self.model.named_parameters():
            parts = n.split(".")
            if "layers" in parts:
                layer = int(parts[parts.index("layers") + 1])
                if layer >= deepest:  # hidden_states[k] is the output of layer k - 1
                    unused.add(f"model.{n}")
            elif not n.startswith((f"{prefix}embeddings", f"{prefix}pre_layrnorm")):
                unused.add(f"model.{n}")  # post_layernorm, pooling head: not on the path to hidden states
        return unused

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)


class CLIPTower(HFViTTower):
    model_cls, config_cls = CLIPVisionModel, CLIPVisionConfig
    default_mean, default_std = CLIP_MEAN, CLIP_STD
    has_class_token = True


class SiglipTower(HFViTTower):
    model_cls, config_cls = SiglipVisionModel, SiglipVisionConfig
    default_mean, default_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    has_class_token = False
