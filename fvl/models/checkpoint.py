"""Saving and loading fvl models.

- ``save_checkpoint`` / ``load_checkpoint``: the whole model as one safetensors file with its config in
  the metadata. Keys are the module paths of ``FlorenceVL``: ``vision.*`` (for Florence-2:
  ``vision.davit.*``, ``vision.image_projection.*``, ``vision.encoder.*``), ``projector.*`` (``projector.{i}``
  for the i-th layer of the MLP, as LLaVA's ``mm_projector.{i}``), ``fusion.*`` (empty for the paper's
  variants) and ``llm.*`` (the transformers causal LM's own names under ``llm.``). Tied tensors are stored once.
- ``export`` / ``load_exported``: a folder whose parts load with plain transformers:
  ``llm/`` (``AutoModelForCausalLM`` + tokenizer with the image token), ``vision/`` (the tower's own class,
  e.g. ``Florence2ForConditionalGeneration``, and its preprocessing: ``AutoImageProcessor`` and
  ``AutoProcessor`` load there), ``projector.safetensors`` and ``fvl_config.yaml``.

The exported image processor is transformers' own (CLIP's for Florence-2 and CLIP towers, SigLIP's for
SigLIP), set to fvl's ``square`` transform: resize to the tower's size (bicubic), rescale, normalise with the
tower's mean and std. With its PIL backend (the default where torchvision is not installed, else
``backend="pil"``) its ``pixel_values`` equal fvl's for any image up to 4x the tower's size per side (tested);
fvl shrinks larger images in two steps (``transform.REDUCING_GAP``), transformers in one, so those differ by a
few grey levels. fvl's ``pad`` mode (the finetune stage's, and ``generate``'s default) has no equivalent
there: pad a non-square image to a square of the mean colour first. For Florence-2 the folder also holds what
``Florence2Processor`` needs: the tokenizer with Florence-2's image token, and the image tokens per image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from fvl.config import dump_yaml, plain, read_yaml, typed
from fvl.config.model import ModelConfig
from fvl.models.florence_vl import FlorenceVL

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
CONFIG_FILE = "fvl_config.yaml"
PROJECTOR_FILE = "projector.safetensors"


def model_config(cfg: Any, overrides: dict | None = None) -> ModelConfig:
    """A validated ``ModelConfig`` from a ``ModelConfig``, a dict or a YAML string, ``overrides`` on top."""
    if isinstance(cfg, ModelConfig) and not overrides:
        return cfg
    return typed(ModelConfig, cfg, overrides, source="model config")


def config_yaml(cfg: ModelConfig) -> str:
    return dump_yaml(cfg)


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_checkpoint(
    model: FlorenceVL,
    path: str | Path,
    extra_metadata: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    commit: bool = True,
) -> Path:
    """Write the model's weights and config to one safetensors file, atomically (temp file + rename).
    ``commit=False`` leaves the finished temp file in ``path``'s folder and returns its path, for a caller
    that renames it together with another file (``fvl.train.checkpointing.commit``).

    A model whose LLM carries LoRA adapters (peft, on a float or a 4-bit NF4 base) is written merged: each
    adapted weight as base + B A x scale in float32, under the plain model's key names, with a config
    without quantization. The file then loads like any other checkpoint (``fvl eval``, ``chat``,
    ``export``, ``init_from``); the training model itself is left untouched. ``state_dict`` (a sharded run's
    gathered full state) is written instead of the model's own tensors."""
    path = Path(path)
    tmp = _atomic_path(path)
    cfg = model.cfg
    metadata = {"fvl_format": FORMAT_VERSION, **(extra_metadata or {})}
    if state_dict is not None:
        if is_lora(model):
            raise NotImplementedError("merging LoRA adapters from a sharded run's state is not supported")
        # Gathered tensors may sit on storages safetensors cannot read directly: write private copies.
        tensors = {k: _dense(v).detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp), metadata={**metadata, "fvl_config": config_yaml(cfg)})
    elif is_lora(model):
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, quantization="none"))
        metadata["fvl_lora"] = "merged"
        save_file(_merged_state_dict(model), str(tmp), metadata={**metadata, "fvl_config": config_yaml(cfg)})
    else:
        save_model(model, str(tmp), metadata={**metadata, "fvl_config": config_yaml(cfg)})
    if not commit:
        return tmp
    os.replace(tmp, path)
    return path


def is_lora(model: FlorenceVL) -> bool:
    return any("lora_" in name for name, _ in model.llm.named_parameters())


def _merged_state_dict(model: FlorenceVL) -> dict[str, torch.Tensor]:
    """The state dict of the plain model that a LoRA model stands for: adapters merged into their bases."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, module in lora_layers.items():
        weight = _dense(module.get_base_layer().weight).float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
        merged[_plain_key(f"{name}.weight")] = weight
        bias = module.get_base_layer().bias
        if bias is not None:
            merged[_plain_key(f"{name}.bias")] = bias.detach()
    inside = tuple(f"{n}." for n in lora_layers)
    for key, value in model.state_dict().items():
        if not key.startswith(inside) and "lora_" not in key:
            merged.setdefault(_plain_key(key), value)
    return _unshared(merged)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, a tied one copied (safetensors stores each storage once)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        value = _dense(value).contiguous().cpu()
        if value.data_ptr() in storages:
            value = value.clone()
        storages.add(value.data_ptr())
        out[key] = value
    return out


def _plain_key(key: str) -> str:
    """peft's names -> the plain model's: ``llm.base_model.model.X`` -> ``llm.X``, ``.base_layer`` dropped."""
    return key.replace("llm.base_model.model.", "llm.", 1).replace(".base_layer.", ".")


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """A 4-bit (bitsandbytes NF4) weight dequantized; any other tensor as it is."""
    state = getattr(tensor, "quant_state", None)
    if state is None:
        return tensor.detach()
    import bitsandbytes.functional as bnbf

    data = tensor.data
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes >= 0.48 repacks a CPU weight for its own gemm on the first forward; dequantizing that
        # layout as it is gives numbers unrelated to the weight (the merged QLoRA checkpoint was garbage)
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state).detach()


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint(path: str | Path, overrides: dict | None = None) -> FlorenceVL:
    """Rebuild the model from the config stored in the checkpoint (optionally overridden), load weights
    strictly (a missing or unexpected key is an error)."""
    meta = read_metadata(path)
    if "fvl_config" not in meta:
        raise ValueError(f"{path}: not an fvl checkpoint (no fvl_config in its metadata)")
    model = FlorenceVL(model_config(meta["fvl_config"], overrides))
    missing, unexpected = load_model(model, str(path), strict=True)
    return model


def export(model: FlorenceVL, out_dir: str | Path) -> Path:
    """Write the transformers-loadable folder described in this module's docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(out / "llm")
    model.tokenizer.save_pretrained(out / "llm")
    model.vision.save_pretrained(out / "vision")
    save_image_processor(model, out / "vision")
    heads = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    heads |= {f"fusion.{k}": v for k, v in model.fusion.state_dict().items()}
    save_file({k: v.contiguous().cpu() for k, v in heads.items()}, str(out / PROJECTOR_FILE))
    cfg = plain(model.cfg)
    cfg["vision"] |= {"init": "pretrained", "path": "vision", "tokenizer_path": None}
    cfg["llm"] |= {"init": "pretrained", "path": "llm"}
    cfg["text"]["tokenizer_path"] = None
    (out / CONFIG_FILE).write_text(dump_yaml(cfg))
    return out


# transformers' image processor that reproduces each tower's ``square`` transform (its PIL backend's class)
IMAGE_PROCESSORS = {
    "florence2": "CLIPImageProcessorPil",
    "clip": "CLIPImageProcessorPil",
    "siglip": "SiglipImageProcessorPil",
}


def save_image_processor(model: FlorenceVL, folder: str | Path) -> None:
    """Write the tower's preprocessing beside its weights (``preprocessor_config.json``, which fvl also reads
    back for the mean and std); for Florence-2 also ``Florence2Processor``'s files, so that
    ``AutoProcessor.from_pretrained(folder)`` gives a working processor."""
    import transformers

    folder = Path(folder)
    name = IMAGE_PROCESSORS.get(model.cfg.vision.name)
    if name is None:
        log.warning(
            "vision tower %r: no transformers image processor known, none exported", model.cfg.vision.name
        )
        return
    tower = model.vision
    settings: dict[str, Any] = {
        "do_resize": True,
        "size": {"height": tower.image_size, "width": tower.image_size},
        "resample": 3,  # PIL's bicubic, as ImageTransform resizes
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(tower.image_mean),
        "image_std": list(tower.image_std),
        "do_convert_rgb": True,
    }
    if name == "CLIPImageProcessorPil":
        settings["do_center_crop"] = False  # CLIP's own processor crops; fvl resizes the whole image
    florence = model.cfg.vision.name == "florence2"
    if florence:
        # transformers' Florence-2 always keeps the pooled token: placeholders per image = DaViT tokens + 1
        settings["image_seq_length"] = tower.num_tokens + (0 if tower.keep_pooled_token else 1)
    image_processor = getattr(transformers, name)(**settings)
    image_processor.save_pretrained(folder)
    if florence:
        tokenizer = _with_image_token(folder, tower.config.image_token_id)
        transformers.Florence2Processor(image_processor, tokenizer).save_pretrained(folder)


def _with_image_token(folder: Path, image_token_id: int):
    """The tower's tokenizer (saved in ``folder``) with the image token ``Florence2Processor`` expands: the
    tokenizer's own when it has one, else ``<image>`` added as a special token, which must land on the
    config's ``image_token_id`` (fvl's random-init Florence-2 keeps the id after the vocabulary for it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "image_token", None) is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": "<image>"})
    if tokenizer.image_token_id != image_token_id:
        raise ValueError(
            f"{folder}: the tokenizer's image token {tokenizer.image_token!r} has id {tokenizer.image_token_id} "
            f"but the Florence-2 config says image_token_id={image_token_id}: fix the tower's tokenizer or config"
        )
    return tokenizer


def load_exported(folder: str | Path, overrides: dict | None = None) -> FlorenceVL:
    """Load a folder written by ``export`` (relative paths in its config resolve against the folder)."""
    folder = Path(folder)
    cfg = read_yaml(folder / CONFIG_FILE)
    cfg["vision"]["path"] = str(folder / cfg["vision"]["path"])
    cfg["llm"]["path"] = str(folder / cfg["llm"]["path"])
    model = FlorenceVL(model_config(cfg, overrides))
    heads = load_file(str(folder / PROJECTOR_FILE))
    model.projector.load_state_dict(
        {k[len("projector.") :]: v for k, v in heads.items() if k.startswith("projector.")}
    )
    model.fusion.load_state_dict(
        {k[len("fusion.") :]: v for k, v in heads.items() if k.startswith("fusion.")}
    )
    return model
