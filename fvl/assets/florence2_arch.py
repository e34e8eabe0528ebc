"""What fvl knows of Florence-2 itself: its task prompts, its published sizes, the DaViT token count and a
config for random init. Shared by the tower (``fvl.models.vision.florence2``), stage 0's build
(``florence2_tiny``) and the converters; it imports transformers' configs only, no model code of fvl's."""

from __future__ import annotations

from transformers import BartConfig, Florence2Config, Florence2VisionConfig

from fvl.config.model import check_arch_keys

# Florence-2's own expansions of its task tokens (its processor feeds these texts, not the tokens).
TASK_PROMPTS = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}


# Florence-2's published sizes as ``model.vision.arch`` dicts, for random init at real size (benchmarks,
# FLOP counts): DaViT (vision_config) and the BART-style encoder-decoder (text_config). ``large`` is the
# arch of the florence_vl_3b / 8b presets. Pass a copy: ``random_init_config`` consumes its argument.
FLORENCE2_ARCHS: dict[str, dict] = {
    "base": {
        "vision_config": {
            "depths": [1, 1, 9, 1],
            "embed_dim": [128, 256, 512, 1024],
            "num_heads": [4, 8, 16, 32],
            "num_groups": [4, 8, 16, 32],
            "window_size": 12,
            "projection_dim": 768,
            "drop_path_rate": 0.1,
        },
        "text_config": {
            "vocab_size": 51289,
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
            "max_position_embeddings": 1024,
        },
    },
    "large": {
        "vision_config": {
            "depths": [1, 1, 9, 1],
            "embed_dim": [256, 512, 1024, 2048],
            "num_heads": [8, 16, 32, 64],
            "num_groups": [8, 16, 32, 64],
            "window_size": 12,
            "projection_dim": 1024,
            "drop_path_rate": 0.1,
        },
        "text_config": {
            "vocab_size": 51289,
            "d_model": 1024,
            "encoder_layers": 12,
            "decoder_layers": 12,
            "encoder_attention_heads": 16,
            "decoder_attention_heads": 16,
            "encoder_ffn_dim": 4096,
            "decoder_ffn_dim": 4096,
            "max_position_embeddings": 1024,
        },
    },
}


def expand_prompt(text: str) -> str:
    """A task token becomes Florence-2's prompt text; free text passes through."""
    stripped = text.strip()
    if stripped.startswith("<") and stripped.endswith(">") and stripped in TASK_PROMPTS:
        return TASK_PROMPTS[stripped]
    if stripped.startswith("<") and stripped.endswith(">") and " " not in stripped:
        raise ValueError(f"unknown Florence-2 task token {stripped!r}; known: {', '.join(TASK_PROMPTS)}")
    return text


def davit_tokens(vision_config, image_size: int) -> int:
    """Tokens of DaViT's last stage for a square image: the conv-embedding arithmetic of each stage."""
    side = image_size
    for k, s, p in zip(
        vision_config.patch_size, vision_config.patch_stride, vision_config.patch_padding, strict=True
    ):
        side = (side + 2 * p - k) // s + 1
    return side * side


def random_init_config(arch: dict, tokenizer) -> Florence2Config:
    """A Florence-2 config for random init whose text side matches ``tokenizer`` (vocab, special ids)."""
    check_arch_keys(Florence2Config, arch, "model.vision.arch")
    text = dict(arch.pop("text_config", {}))
    check_arch_keys(BartConfig, text, "model.vision.arch.text_config")
    check_arch_keys(Florence2VisionConfig, arch.get("vision_config", {}), "model.vision.arch.vision_config")
    text.setdefault("vocab_size", len(tokenizer) + 1)  # + the image token id of Florence-2's own format
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        text[key] = getattr(tokenizer, key)
    text.setdefault("decoder_start_token_id", tokenizer.eos_token_id)
    arch.setdefault("image_token_id", text["vocab_size"] - 1)
    return Florence2Config(text_config={"model_type": "bart", **text}, **arch)
