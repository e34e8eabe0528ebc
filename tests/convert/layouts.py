"""Tiny checkpoints written in other projects' layouts, for the import tests.

- Microsoft's Florence-2 for remote code: ``remote_config`` (config.json as their configuration_florence2.py
  writes it) and ``to_remote`` (weights under modeling_florence2.py's module names). ``to_remote`` is the
  inverse of the import's mapping, written here on its own from the remote modelling file, so that the two
  check each other.
- The authors' Florence-VL (their LLaVA fork): ``write_florence_vl``.

No file written here is ever executed: the ``*.py`` files they would hold are stubs that raise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Florence2ForConditionalGeneration, Phi3Config, Phi3ForCausalLM

from fvl.assets.florence2_arch import random_init_config
from fvl.assets.tiny_tokenizers import tiny_tokenizer_dirs
from fvl.config.model import plain_dict
from fvl.convert.florence2 import PROCESSOR_TOKENS
from tests.fixtures import tiny_cfg

REMOTE_CODE = "raise RuntimeError('remote code was executed')\n"
FLORENCE_VOCAB = 512 + len(PROCESSOR_TOKENS)  # the tiny BPE + the processor's tokens (as 50265 + 1024)


def florence_tokenizer(with_processor_tokens: bool):
    """The tiny Florence-2 tokenizer; with the tokens Microsoft's processor adds (as a saved processor's)."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dirs()[1])
    if with_processor_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(PROCESSOR_TOKENS)})
    return tok


def native_florence2(seed: int = 1) -> Florence2ForConditionalGeneration:
    """A tiny transformers-native Florence-2 (decoder included) of the tiny preset's architecture."""
    arch = plain_dict(tiny_cfg().vision.arch)
    arch["text_config"] = {**arch["text_config"], "vocab_size": FLORENCE_VOCAB}
    config = random_init_config(arch, florence_tokenizer(False))
    torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(config).eval()


def remote_config(model: Florence2ForConditionalGeneration) -> dict:
    """config.json of the remote-code layout for ``model``'s architecture."""
    v, t = model.config.vision_config, model.config.text_config
    text = {k: getattr(t, k) for k in (
        "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
        "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
        "activation_function", "dropout", "attention_dropout", "activation_dropout", "init_std",
        "encoder_layerdrop", "decoder_layerdrop", "scale_embedding", "bos_token_id", "eos_token_id",
        "pad_token_id", "decoder_start_token_id", "forced_eos_token_id",
    )}  # fmt: skip
    # what Microsoft's text_config holds besides: generation settings and fields the remote code never reads
    text |= {"num_beams": 3, "no_repeat_ngram_size": 3, "early_stopping": True, "forced_bos_token_id": 0}
    text |= {"normalize_before": False, "add_final_layer_norm": False, "label2id": {"LABEL_0": 0}}
    return {
        "_name_or_path": "florence2",
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
        },
        "model_type": "florence2",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "projection_dim": v.projection_dim,
        "vocab_size": t.vocab_size,
        "torch_dtype": "float32",
        "is_encoder_decoder": True,
        "text_config": text,
        "vision_config": {
            "model_type": "davit",
            "drop_path_rate": v.drop_path_rate,
            "patch_size": list(v.patch_size),
            "patch_stride": list(v.patch_stride),
            "patch_padding": list(v.patch_padding),
            "patch_prenorm": list(v.patch_prenorm),
            "enable_checkpoint": False,
            "dim_embed": list(v.embed_dim),
            "num_heads": list(v.num_heads),
            "num_groups": list(v.num_groups),
            "depths": list(v.depths),
            "window_size": v.window_size,
            "projection_dim": v.projection_dim,
            "visual_temporal_embedding": {
                "type": "COSINE",
                "max_temporal_embeddings": v.max_temporal_embeddings,
            },
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v.max_position_embeddings},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
    }


def _remote_key(key: str) -> str:
    """A native key under modeling_florence2.py's names (DaViT's PreNorm/MySequential wrappers, etc.)."""
    if key.startswith("model.vision_tower."):
        k = key[len("model.") :]
        k = re.sub(r"convs\.(\d+)\.conv\.", r"convs.\1.proj.", k)
        k = re.sub(r"_block\.conv([12])\.", r"_block.conv\1.fn.dw.", k)
        k = k.replace("spatial_block.norm1.", "spatial_block.window_attn.norm.")
        k = k.replace("channel_block.norm1.", "channel_block.channel_attn.norm.")
        k = re.sub(r"(window_attn|channel_attn)\.(qkv|proj)\.", r"\1.fn.\2.", k)
        k = k.replace("_block.norm2.", "_block.ffn.norm.")
        return re.sub(r"ffn\.(fc[12])\.", r"ffn.fn.net.\1.", k)
    if key.startswith("model.multi_modal_projector."):
        k = key[len("model.multi_modal_projector.") :]
        return (
            "image_projection"
            if k == "image_projection.weight"
            else k.replace("image_position_embed", "image_pos_embed")
        )
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    assert key == "lm_head.weight", key
    return "language_model.lm_head.weight"


def to_remote(
    model: Florence2ForConditionalGeneration, parameters_only: bool = False
) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the remote layout's names: its full ``state_dict()`` (tied tables under each
    name, the buffers, a zero ``final_logits_bias``), or, with ``parameters_only``, what a save of
    ``named_parameters()`` holds (Florence-VL's vision_tower/: no buffers, tied tables once, as ``shared``)."""
    tied = ("encoder.embed_tokens", "decoder.embed_tokens", "lm_head")
    out = {}
    named = dict(model.named_parameters()) if parameters_only else model.state_dict()
    for key, value in named.items():
        if parameters_only and any(t in key for t in tied):
            continue
        out[_remote_key(key)] = value.detach().clone()
    out["image_projection"] = out["image_projection"].t().contiguous()
    if not parameters_only:
        out["language_model.final_logits_bias"] = torch.zeros(1, model.config.text_config.vocab_size)
    return out


def write_remote_florence2(model, folder: Path, fmt: str = "bin", parameters_only: bool = False,
                           processor_tokens: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """A remote-layout Florence-2 folder for ``model``; the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(remote_config(model), indent=1))
    weights = to_remote(model, parameters_only)
    if fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file(weights, str(folder / "model.safetensors"))
    florence_tokenizer(processor_tokens).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
        "processor_class": "Florence2Processor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_resize": True,
        "size": {"height": 64, "width": 64}, "do_center_crop": False, "crop_size": {"height": 64, "width": 64},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_seq_length": 17,
    }))  # fmt: skip
    for name in ("modeling_florence2.py", "configuration_florence2.py", "processing_florence2.py"):
        (folder / name).write_text(REMOTE_CODE)
    return weights


# ---- Florence-VL ---------------------------------------------------------------------------------------------
def tiny_phi3(seed: int = 2) -> Phi3ForCausalLM:
    """The tiny preset's Phi-3 LLM, its vocabulary the tiny LLM tokenizer's (no image token: theirs has none)."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dirs()[0])
    arch = {k: v for k, v in plain_dict(tiny_cfg().llm.arch).items() if k != "model_type"}
    config = Phi3Config(**arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config).eval()


def dual_mlp(in_dim: int, hidden: int, depth: int = 3, seed: int = 3) -> dict[str, torch.Tensor]:
    """Their DualMLPProjector's weights (``encoder_mlp.0`` Linear, then ``encoder_mlp.{i}.1`` after GELU)."""
    g = torch.Generator().manual_seed(seed)
    out, width = {}, in_dim
    for i in range(depth):
        name = "encoder_mlp.0" if i == 0 else f"encoder_mlp.{i}.1"
        out[f"{name}.weight"] = torch.randn(hidden, width, generator=g) / width**0.5
        out[f"{name}.bias"] = torch.randn(hidden, generator=g) * 0.1
        width = hidden
    return out


def write_florence_vl(folder: Path, florence, llm, projector: dict[str, torch.Tensor],
                      vision_in_main: bool) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """Their LLaVA-fork folder: config.json (Phi-3's, model_type llava_phi, mm_* fields), model.safetensors
    (the LLM, ``model.mm_projector.*`` and, with ``vision_in_main``, Florence-2 under
    ``model.vision_tower.vision_tower.*``), the LLM tokenizer and vision_tower/ (Florence-2 as their training
    script saves it: named_parameters() in pytorch_model.bin). Returns the tensors of each file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = llm.config.to_dict()
    rope = config.pop("rope_parameters")  # as transformers 4.4x wrote it
    config |= {"rope_theta": rope["rope_theta"], "rope_scaling": None, "transformers_version": "4.44.0"}
    config |= {
        "model_type": "llava_phi",
        "architectures": ["LlavaPhiForCausalLM"],
        "torch_dtype": "float32",
        "mm_vision_tower": "/fsx/jiuhai/florence-phi-pretrain/vision_tower",
        "mm_projector_type": "mlp3x_gelu",
        "mm_hidden_size": florence.config.vision_config.projection_dim,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 256,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    main = {k: v.detach().clone() for k, v in llm.state_dict().items()}
    main |= {f"model.mm_projector.{k}": v for k, v in projector.items()}
    if vision_in_main:
        main |= {f"model.vision_tower.vision_tower.{k}": v for k, v in to_remote(florence).items()}
    save_file(main, str(folder / "model.safetensors"))
    AutoTokenizer.from_pretrained(tiny_tokenizer_dirs()[0]).save_pretrained(folder)
    vision = write_remote_florence2(florence, folder / "vision_tower", "bin", True, processor_tokens=True)
    return {"main": main, "vision_tower": vision}
