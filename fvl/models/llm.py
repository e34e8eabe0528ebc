"""The language model: any transformers causal LM from a local folder, or random-init from a config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fvl.config.model import LLMConfig, TextConfig, check_arch_keys, plain_dict
from fvl.models.vision.base import DTYPES, require_local_dir
from fvl.text import load_tokenizer

log = logging.getLogger(__name__)


def build_llm(cfg: LLMConfig, text: TextConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(llm, tokenizer)``: the tokenizer with fvl's image placeholder, and the LLM loaded or built with
    room for every token the tokenizer has beyond the embedding table, so every token id is valid."""
    tokenizer = build_tokenizer(cfg, text)
    return _build_model(cfg, tokenizer), tokenizer


def build_tokenizer(cfg: LLMConfig, text: TextConfig) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer plus the image placeholder (no model is built: the data side uses this)."""
    path = llm_tokenizer_path(text.tokenizer_path, cfg)
    return load_tokenizer(path, text.image_token, trust_remote_code=cfg.trust_remote_code)


def _build_model(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    dtype = DTYPES[cfg.frozen_dtype]
    if cfg.init == "pretrained":
        path = require_local_dir(cfg.path, "model.llm.path", "causal LM")
        extra = {}
        if cfg.quantization == "nf4":
            from transformers import BitsAndBytesConfig

            compute = torch.bfloat16 if dtype == torch.float32 else dtype
            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True,
            )
            # Weights are quantized as they are placed: on this process's GPU (one per rank), else the CPU.
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            extra["device_map"] = {"": local_rank} if torch.cuda.is_available() else "cpu"
        if cfg.trust_remote_code:
            log.warning("model.llm.trust_remote_code=true: running the Python code shipped in %s", path)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
    else:
        arch = plain_dict(cfg.arch)
        if "model_type" not in arch:
            raise ValueError("model.llm.arch.model_type is required for random init (e.g. phi3, llama)")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if arch["model_type"] not in CONFIG_MAPPING:
            raise ValueError(
                f"model.llm.arch.model_type={arch['model_type']!r} is not a transformers architecture"
            )
        check_arch_keys(CONFIG_MAPPING[arch["model_type"]], arch, "model.llm.arch")
        arch.setdefault("vocab_size", len(tokenizer))
        # Special ids follow the tokenizer, never the architecture's defaults (Phi-3's are for its own vocab).
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            arch[key] = getattr(tokenizer, key)
        config = AutoConfig.for_model(**arch)
        config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        log.info("resizing LLM embeddings %d -> %d for added tokens", vocab, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_activations(model, cfg.keep_activations)
    if cfg.kernels:
        from fvl.models.kernels import apply_kernels

        log.info("liger kernels in the LLM: %s", apply_kernels(model, cfg.kernels))
    if cfg.compile:
        compile_decoder_layers(model)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's repeated blocks (transformers' ``GradientCheckpointingLayer`` instances), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor", **options) -> int:
    """Regional compilation (``model.llm.compile``): each decoder layer compiled in place with
    ``nn.Module.compile``, traced at its first call (after any cast or sharding); the layers share one
    compiled graph while their shapes agree. Returns how many were compiled. ``backend`` and ``options`` go
    to ``torch.compile`` (tests pass ``aot_eager``, which skips inductor's C++ build)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend, **options)
    return len(layers)


def keep_activations(model: torch.nn.Module, layers: int) -> None:
    """Let the last ``layers`` decoder layers keep their activations instead of recomputing them in backward
    (the rest stay checkpointed): fewer FLOPs per step for memory, where memory is left over."""
    blocks = decoder_layers(model)
    if layers > len(blocks):
        raise ValueError(f"model.llm.keep_activations={layers}: the LLM has {len(blocks)} decoder layers")
    for block in blocks[len(blocks) - layers :]:
        block.gradient_checkpointing = False


def llm_tokenizer_path(cfg_path: str | None, llm: LLMConfig) -> Path:
    """Where the LLM tokenizer lives: explicit path (``builtin:NAME`` for one fvl builds), else the LLM's
    folder, else the built-in tiny one."""
    if cfg_path:
        from fvl.assets.builtin import resolve

        return Path(str(resolve(cfg_path))).expanduser()
    if llm.init == "pretrained":
        return require_local_dir(llm.path, "model.llm.path", "causal LM")
    from fvl.assets.tiny_tokenizers import tiny_tokenizer_dirs

    return tiny_tokenizer_dirs()[0]
