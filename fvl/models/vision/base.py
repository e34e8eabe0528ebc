"""What every vision tower provides to the rest of fvl: named features of one token count each."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fvl.config.model import VisionConfig
from fvl.inputs.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VisionTower(nn.Module, ABC):
    """A vision backbone that returns a dict of named features, each ``[B, num_tokens, dim]``.

    Subclasses set ``image_size``, ``image_mean`` and ``image_std`` (the preprocessing the data pipeline
    applies) and implement the abstract methods. ``features(pixel_values, names)`` computes only the features
    named, so an ablation that drops a prompt does not pay for it. The class methods answer from the config
    alone, without building the tower: the data side uses them to prepare batches (see ``fvl.models.processor``).
    """

    default_mean: tuple[float, float, float] = IMAGENET_MEAN
    default_std: tuple[float, float, float] = IMAGENET_STD

    image_size: int
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    compiled: bool = False  # set by ``compile``

    @property
    @abstractmethod
    def feature_names(self) -> list[str]:
        """Names of all features this tower can produce, in a stable order."""

    @abstractmethod
    def feature_dim(self, name: str) -> int:
        """Channel width of feature ``name``."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Tokens per image of every feature at ``image_size``."""

    @abstractmethod
    def features(
        self, pixel_values: torch.Tensor, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """``{name: [B, num_tokens, dim]}`` for ``names`` (default: all)."""

    @abstractmethod
    def unused_parameters(self, names: Sequence[str]) -> set[str]:
        """Parameter names that cannot influence the features ``names`` (they are never trained)."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a folder that plain transformers ``from_pretrained`` loads."""

    @classmethod
    @abstractmethod
    def tokens_for(cls, cfg: VisionConfig) -> int:
        """Tokens per image of every feature for ``cfg``, read from its config, without building the tower."""

    @classmethod
    def transform_for(cls, cfg: VisionConfig, mode: str = "square") -> ImageTransform:
        """The preprocessing this tower expects: its resolution, and the mean / std of a pretrained folder's
        ``preprocessor_config.json`` (else the architecture's defaults)."""
        mean, std = read_image_stats(cfg.path, cls.default_mean, cls.default_std)
        return ImageTransform(cfg.image_size, mean, std, mode)

    def transform(self, mode: str = "square") -> ImageTransform:
        return ImageTransform(self.image_size, tuple(self.image_mean), tuple(self.image_std), mode)

    @abstractmethod
    def wrap_classes(self) -> set[type[nn.Module]]:
        """Classes of this tower's repeated blocks: FSDP wrap units and activation-checkpointing units."""

    @abstractmethod
    def compile_units(self) -> list[nn.Module]:
        """The submodules ``features`` spends its time in, the units ``compile`` hands to ``torch.compile``."""

    def compile(self, backend: str = "inductor", **options) -> None:
        """Compile the feature computation (``model.vision.compile``): each of ``compile_units()`` in place,
        with ``nn.Module.compile``, so class and parameter names stay (no ``_orig_mod.`` in checkpoints,
        FSDP still finds the blocks by class) and each unit is traced at its first call, after any dtype
        cast or sharding. ``features`` itself stays eager: its Python (feature names, prompt subsets) would
        only add guards. The tower's own ``forward`` is not what fvl calls, so ``nn.Module.compile`` on the
        tower would compile nothing that runs; this override is what a caller of ``tower.compile()`` means.
        ``backend`` and ``options`` go to ``torch.compile``: ``model.vision.compile`` takes the default,
        inductor; tests pass ``aot_eager``, which skips inductor's C++ build (minutes on a small CPU)."""
        for unit in self.compile_units():
            unit.compile(backend=backend, **options)
        self.compiled = True

    @staticmethod
    def check_pixels(pixel_values: torch.Tensor) -> None:
        """The tower takes normalised float pixels: a ``uint8`` batch cast as is would be silently wrong."""
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"vision tower given {pixel_values.dtype} pixels: normalise uint8 images first with "
                "transform.normalize (FlorenceVL.encode_images does)"
            )

    def check_names(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self.feature_names)
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise KeyError(f"unknown vision feature(s) {unknown}; this tower has {self.feature_names}")
        return list(names)


def read_image_stats(path: str | Path | None, default_mean, default_std) -> tuple[tuple, tuple]:
    """Mean/std from a pretrained folder's ``preprocessor_config.json`` when it has one."""
    from fvl.assets.builtin import resolve

    path = resolve(str(path)) if path is not None else None
    if path is not None:
        pre = Path(path) / "preprocessor_config.json"
        if pre.exists():
            data = json.loads(pre.read_text())
            if "image_mean" in data and "image_std" in data:
                return tuple(data["image_mean"]), tuple(data["image_std"])
    return tuple(default_mean), tuple(default_std)


def require_local_dir(path: str | None, key: str, what: str) -> Path:
    """The local folder of a pretrained model (``builtin:NAME``: fvl's own, built on first use), with a clear
    error for the most common mistake: a pretrained model without a local folder."""
    from fvl.assets.builtin import resolve

    path = resolve(path)
    if not path:
        raise FileNotFoundError(
            f"{key} is not set: put {what} in a local folder and pass {key}=DIR "
            f"(or set the matching init=random to build it with random weights)."
        )
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{key}={path!r}: no config.json there; expected a local {what} folder")
    return p
