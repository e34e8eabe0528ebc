"""Saving and loading fvl models.

- ``save_checkpoint`` / ``load_checkpoint``: the whole model as one safetensors file with its config in
  the metadata. Keys are the module paths of ``FlorenceVL``: ``vision.*`` (for Florence-2:
  ``vision.davit.*``, ``vision.image_projection.*``, ``vision.encoder.*``), ``projector.*`` (``projector.{i}``
  for the i-th layer of the MLP, as LLaVA's ``mm_projector.{i}``), ``fusion.*`` (empty for the paper's
  variants) and ``llm.*`` (the transformers causal LM's own names under ``llm.``). Tied tensors are stored once.

Exporting to folders that plain transformers loads is ``fvl.convert.export``'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from fvl.config import dump_yaml, typed
from fvl.config.model import ModelConfig
from fvl.models.florence_vl import FlorenceVL
from fvl.util.files import replacing, temp_beside

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"


def model_config(cfg: Any, overrides: dict | None = None) -> ModelConfig:
    """A validated ``ModelConfig`` from a ``ModelConfig``, a dict or a YAML string, ``overrides`` on top."""
    if isinstance(cfg, ModelConfig) and not overrides:
        return cfg
    return typed(ModelConfig, cfg, overrides, source="model config")


def config_yaml(cfg: ModelConfig) -> str:
    return dump_yaml(cfg)


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
    tmp = temp_beside(path)
    cfg = model.cfg
    metadata = {"fvl_format": FORMAT_VERSION, **(extra_metadata or {})}
    if state_dict is not None:
        if is_lora(model):
            raise NotImplementedError("merging LoRA adapters from a sharded run's state is not supported")
        _save_state(cfg, state_dict, tmp, metadata)
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


def _save_state(
    cfg: ModelConfig, state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    # Gathered tensors may sit on storages safetensors cannot read directly: write private copies.
    tensors = {k: _dense(v).detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={**metadata, "fvl_config": config_yaml(cfg)})


def save_state(cfg: ModelConfig, state: dict[str, torch.Tensor], path: str | Path, **metadata: str) -> Path:
    """A model state (a sharded run's weights read on one process) as an fvl checkpoint of config ``cfg``,
    written atomically, without building the model."""
    with replacing(path) as tmp:
        _save_state(cfg, state, tmp, {"fvl_format": FORMAT_VERSION, **metadata})
    return Path(path)


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
    load_state_strict(model, load_file(str(path)))
    return model


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` where a tensor the model shares under several names (tied input and
    output embeddings: Qwen3, Llama 3.2) may come under any one of them: safetensors' ``save_model`` keeps one
    name of each shared tensor, a gathered FSDP state keeps all; both load. Anything else missing or extra is
    an error, as strict loading says."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    state = dict(state)
    for names in groups.values():
        present = [n for n in names if n in state]
        if len(names) > 1 and present:
            for n in names:
                state.setdefault(n, state[present[0]])
    model.load_state_dict(state, strict=True)
