"""Saving and loading fvl models.

- ``save_checkpoint`` / ``load_checkpoint``: the whole model as one safetensors file with its config in
  the metadata. Keys are the module paths of ``FlorenceVL``: ``vision.*`` (for Florence-2:
  ``vision.davit.*``, ``vision.image_projection.*``, ``vision.encoder.*``), ``projector.*`` (``projector.{i}``
  for the i-th layer of the MLP, as LLaVA's ``mm_projector.{i}``), ``fusion.*`` (empty for the paper's
  variants) and ``llm.*`` (the transformers causal LM's own names under ``llm.``). Tied tensors are stored once.
- ``export`` / ``load_exported``: a folder whose parts load with plain transformers:
  ``llm/`` (``AutoModelForCausalLM`` + tokenizer with the image token), ``vision/`` (the tower's own class,
  e.g. ``Florence2ForConditionalGeneration``), ``projector.safetensors`` and ``fvl_config.yaml``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from fvl.models.config import ModelConfig
from fvl.models.florence_vl import FlorenceVL

FORMAT_VERSION = "1"
CONFIG_FILE = "fvl_config.yaml"
PROJECTOR_FILE = "projector.safetensors"


def model_config(cfg: Any) -> ModelConfig:
    """A validated ``ModelConfig`` from a DictConfig, a dict, a YAML string or a ``ModelConfig``."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, str):
        cfg = OmegaConf.create(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
    return OmegaConf.to_object(merged)


def config_yaml(cfg: ModelConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_checkpoint(
    model: FlorenceVL, path: str | Path, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write the model's weights and config to one safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    tmp = _atomic_path(path)
    metadata = {"fvl_format": FORMAT_VERSION, "fvl_config": config_yaml(model.cfg), **(extra_metadata or {})}
    save_model(model, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint(path: str | Path, overrides: DictConfig | dict | None = None) -> FlorenceVL:
    """Rebuild the model from the config stored in the checkpoint (optionally overridden), load weights
    strictly (a missing or unexpected key is an error)."""
    meta = read_metadata(path)
    if "fvl_config" not in meta:
        raise ValueError(f"{path}: not an fvl checkpoint (no fvl_config in its metadata)")
    cfg = OmegaConf.create(meta["fvl_config"])
    if overrides is not None:
        cfg = OmegaConf.merge(cfg, overrides)
    model = FlorenceVL(model_config(cfg))
    missing, unexpected = load_model(model, str(path), strict=True)
    return model


def export(model: FlorenceVL, out_dir: str | Path) -> Path:
    """Write the transformers-loadable folder described in this module's docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(out / "llm")
    model.tokenizer.save_pretrained(out / "llm")
    model.vision.save_pretrained(out / "vision")
    heads = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    heads |= {f"fusion.{k}": v for k, v in model.fusion.state_dict().items()}
    save_file({k: v.contiguous().cpu() for k, v in heads.items()}, str(out / PROJECTOR_FILE))
    cfg = OmegaConf.structured(model.cfg)
    cfg.vision.init, cfg.vision.path, cfg.vision.tokenizer_path = "pretrained", "vision", None
    cfg.llm.init, cfg.llm.path = "pretrained", "llm"
    cfg.text.tokenizer_path = None
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    return out


def load_exported(folder: str | Path, overrides: dict | None = None) -> FlorenceVL:
    """Load a folder written by ``export`` (relative paths in its config resolve against the folder)."""
    folder = Path(folder)
    cfg = OmegaConf.load(folder / CONFIG_FILE)
    cfg.vision.path = str(folder / cfg.vision.path)
    cfg.llm.path = str(folder / cfg.llm.path)
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    model = FlorenceVL(model_config(cfg))
    heads = load_file(str(folder / PROJECTOR_FILE))
    model.projector.load_state_dict(
        {k[len("projector.") :]: v for k, v in heads.items() if k.startswith("projector.")}
    )
    model.fusion.load_state_dict(
        {k[len("fusion.") :]: v for k, v in heads.items() if k.startswith("fusion.")}
    )
    return model
