"""Florence-2 checkpoints in Microsoft's remote-code layout -> transformers' native layout.

The ``microsoft/Florence-2-*`` folders are written for ``trust_remote_code``: ``config.json`` (``model_type:
florence2``, ``auto_map`` to ``modeling_florence2.py``, a DaViT ``vision_config`` with ``dim_embed``) and
weights named after that file's modules (``vision_tower.*``, ``image_projection``, ``image_pos_embed.*``,
``visual_temporal_embed.*``, ``language_model.model.encoder.*`` ...). transformers 5 ships Florence-2 itself
(``Florence2ForConditionalGeneration``, the ``florence-community/Florence-2-*`` layout), which fvl loads via
``model.vision.path``. transformers' own conversion script (``convert_florence2_original_pytorch_to_hf.py``)
is not part of the installed package (wheels leave ``convert_*`` scripts out) and runs the remote code to get
its weights, so the mapping is written here, rule by rule after that script and the remote modelling file,
and applied strictly (``fvl.convert.keys``). Nothing from the source folder is executed: the config is read
as JSON, weights through safetensors or ``torch.load(weights_only=True)``.

What the conversion does beyond renaming, as transformers' script does:
- ``image_projection`` (a ``[D_in, D_out]`` parameter used as ``x @ W``) becomes a ``Linear`` weight: transposed;
- the tokenizer gets the tokens the remote processor adds when it is built (``<od>`` ... ``<loc_0..999>`` ...
  ``<and>``, only those missing) and the ``<image>`` token; the vocabulary tables grow to a multiple of 64
  with the mean of the existing rows in the new ones;
- ``language_model.final_logits_bias`` (a buffer the native model lacks) is dropped after checking that it
  is zero (anything else would change the logits).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fvl.convert.files import copy_tokenizer, load_weights, read_config, require_dir, without_auto_map
from fvl.convert.keys import Report, Rule, convert, grow_rows, transpose

log = logging.getLogger(__name__)

# The tokens Microsoft's processing_florence2.py adds to BART's tokenizer in Florence2Processor.__init__.
PROCESSOR_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>"]
    + ["<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>"]
    + ["</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
)
IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64  # transformers' conversion pads the vocabulary to a multiple of 64

# remote DaViT.from_config and _build_image_projection_layers read these vision_config keys (native names)
VISION_KEYS = {
    "depths": "depths",
    "dim_embed": "embed_dim",
    "num_heads": "num_heads",
    "num_groups": "num_groups",
    "patch_size": "patch_size",
    "patch_stride": "patch_stride",
    "patch_padding": "patch_padding",
    "patch_prenorm": "patch_prenorm",
    "window_size": "window_size",
    "drop_path_rate": "drop_path_rate",
    "projection_dim": "projection_dim",
}
# BART architecture keys of the remote text_config (same names in transformers' BartConfig)
TEXT_REQUIRED = (
    "vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "max_position_embeddings",
)
TEXT_OPTIONAL = (
    "activation_function",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "init_std",
    "encoder_layerdrop",
    "decoder_layerdrop",
    "scale_embedding",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "forced_eos_token_id",
    "classifier_dropout",
)
IMAGE_FEATURE_SOURCE = ["spatial_avg_pool", "temporal_avg_pool"]  # what the native projector computes

_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)\."
_NATIVE_BLOCK = r"model.vision_tower.blocks.\1.\2.\3."
_SPATIAL = r"vision_tower\.blocks\.(\d+)\.(\d+)\.spatial_block\.window_attn\."
_CHANNEL = r"vision_tower\.blocks\.(\d+)\.(\d+)\.channel_block\.channel_attn\."


def _zero_bias(tensor: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    if torch.count_nonzero(tensor):
        raise ValueError(
            "language_model.final_logits_bias is not zero: transformers' native Florence-2 has no such bias, "
            "so dropping it would change the logits"
        )
    return tensor


# remote key -> native key (transformers' convert_florence2_original_pytorch_to_hf.py, rule for rule)
REMOTE_RULES: list[Rule] = [
    Rule(r"vision_tower\.convs\.(\d+)\.proj\.(weight|bias)", r"model.vision_tower.convs.\1.conv.\2"),
    Rule(r"vision_tower\.convs\.(\d+)\.norm\.(weight|bias)", r"model.vision_tower.convs.\1.norm.\2"),
    Rule(_BLOCK + r"conv([12])\.fn\.dw\.(weight|bias)", _NATIVE_BLOCK + r"conv\4.\5"),
    Rule(_SPATIAL + r"norm\.(weight|bias)", r"model.vision_tower.blocks.\1.\2.spatial_block.norm1.\3"),
    Rule(_CHANNEL + r"norm\.(weight|bias)", r"model.vision_tower.blocks.\1.\2.channel_block.norm1.\3"),
    Rule(
        _SPATIAL + r"fn\.(qkv|proj)\.(weight|bias)",
        r"model.vision_tower.blocks.\1.\2.spatial_block.window_attn.\3.\4",
    ),
    Rule(
        _CHANNEL + r"fn\.(qkv|proj)\.(weight|bias)",
        r"model.vision_tower.blocks.\1.\2.channel_block.channel_attn.\3.\4",
    ),
    Rule(_BLOCK + r"ffn\.norm\.(weight|bias)", _NATIVE_BLOCK + r"norm2.\4"),
    Rule(_BLOCK + r"ffn\.fn\.net\.(fc1|fc2)\.(weight|bias)", _NATIVE_BLOCK + r"ffn.\4.\5"),
    Rule(r"image_projection", "model.multi_modal_projector.image_projection.weight", transpose),
    Rule(r"image_proj_norm\.(weight|bias)", r"model.multi_modal_projector.image_proj_norm.\1"),
    Rule(
        r"image_pos_embed\.(row|column)_embeddings\.weight",
        r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight",
    ),
    Rule(
        r"visual_temporal_embed\.pos_idx_to_embed",
        "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
    ),
    Rule(r"language_model\.final_logits_bias", None, _zero_bias, "a zero output bias the native model lacks"),
    Rule(
        r"language_model\.model\.(shared|encoder\.embed_tokens|decoder\.embed_tokens)\.weight",
        r"model.language_model.\1.weight",
        grow_rows,
    ),
    Rule(r"language_model\.lm_head\.weight", "lm_head.weight", grow_rows),
    Rule(r"language_model\.model\.((?:encoder|decoder)\..+)", r"model.language_model.\1"),
]
# Native buffers a save of ``named_parameters()`` (Florence-VL's vision_tower/) leaves out: constants.
KEEP = {
    "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed": (
        "sinusoidal constant, absent from the source: the native model's own"
    )
}


@dataclass
class NativeConfig:
    """The native ``Florence2Config`` kwargs of a remote config, and the remote keys that had no effect on
    the architecture (generation settings, fields the remote code never reads), reported, not silently lost."""

    kwargs: dict[str, Any]
    ignored: list[str] = field(default_factory=list)

    def build(self, vocab_size: int | None = None, image_token_id: int | None = None):
        from transformers import Florence2Config

        kwargs = json.loads(json.dumps(self.kwargs))
        if vocab_size is not None:
            kwargs["text_config"]["vocab_size"] = vocab_size
        last = kwargs["text_config"]["vocab_size"] - 1
        return Florence2Config(**kwargs, image_token_id=last if image_token_id is None else image_token_id)


def layout(config: dict[str, Any], folder: Path) -> str:
    """``remote`` (Microsoft's layout for remote code) or ``native`` (transformers' Florence2); anything
    else is an error that says what the folder holds instead."""
    model_type = config.get("model_type")
    vision = config.get("vision_config") or {}
    if model_type != "florence2":
        raise ValueError(
            f"{folder}: config.json has model_type {model_type!r}, not a Florence-2 checkpoint "
            "(expected model_type florence2, from microsoft/Florence-2-* or florence-community/Florence-2-*)"
        )
    if vision.get("model_type") == "davit" or "dim_embed" in vision:
        return "remote"
    if vision.get("model_type") == "florence_vision" or "embed_dim" in vision:
        return "native"
    raise ValueError(
        f"{folder}: a florence2 config.json whose vision_config is neither DaViT for remote code "
        "(model_type davit, dim_embed) nor transformers' native one (model_type florence_vision, embed_dim)"
    )


def native_config(remote: dict[str, Any]) -> NativeConfig:
    """transformers' ``Florence2Config`` kwargs for a remote ``config.json`` (see ``VISION_KEYS``)."""
    vision_in = dict(remote.get("vision_config") or {})
    text_in = dict(remote.get("text_config") or {})
    missing = [f"vision_config.{k}" for k in VISION_KEYS if k not in vision_in]
    missing += [f"text_config.{k}" for k in TEXT_REQUIRED if k not in text_in]
    for key in ("image_pos_embed", "visual_temporal_embedding"):
        if not isinstance(vision_in.get(key), dict):
            missing.append(f"vision_config.{key}")
    if missing:
        raise ValueError(f"Florence-2 config.json lacks {', '.join(missing)}")
    pos, temporal = vision_in.pop("image_pos_embed"), vision_in.pop("visual_temporal_embedding")
    source = vision_in.pop("image_feature_source", IMAGE_FEATURE_SOURCE)
    if (
        pos.get("type") != "learned_abs_2d"
        or temporal.get("type") != "COSINE"
        or source != IMAGE_FEATURE_SOURCE
    ):
        raise ValueError(
            "Florence-2 vision_config: transformers' Florence-2 implements image_pos_embed.type learned_abs_2d, "
            f"visual_temporal_embedding.type COSINE and image_feature_source {IMAGE_FEATURE_SOURCE}; got "
            f"{pos.get('type')!r}, {temporal.get('type')!r}, {source}"
        )
    vision = {native: vision_in.pop(key) for key, native in VISION_KEYS.items()}
    vision["max_position_embeddings"] = pos["max_pos_embeddings"]
    vision["max_temporal_embeddings"] = temporal["max_temporal_embeddings"]
    text = {"model_type": "bart", **{k: text_in.pop(k) for k in TEXT_REQUIRED}}
    text.update({k: text_in.pop(k) for k in TEXT_OPTIONAL if k in text_in})
    if text.get("scale_embedding"):
        raise ValueError(
            "Florence-2 text_config.scale_embedding=true: the remote code embeds prompts unscaled (shared), "
            "transformers' Florence-2 scales them; the converted model would differ"
        )
    ignored = [f"vision_config.{k}" for k in sorted(vision_in) if k != "model_type"]
    ignored += [f"text_config.{k}" for k in sorted(text_in) if k != "model_type"]
    return NativeConfig({"vision_config": vision, "text_config": text}, ignored)


def remote_to_native(
    weights: dict[str, torch.Tensor], model: torch.nn.Module, rules: list[Rule] | None = None
) -> tuple[dict[str, torch.Tensor], Report]:
    """Every tensor of the native ``model`` (a ``Florence2ForConditionalGeneration``, its state dict the
    contract) from remote-layout ``weights``, strictly. ``rules`` come before ``REMOTE_RULES``."""
    return convert(
        weights, [*(rules or []), *REMOTE_RULES], model.state_dict(), "Florence-2 remote -> native", KEEP
    )


def extend_tokenizer(folder: Path):
    """The tokenizer of ``folder`` with what the remote processor adds when it is built, then ``<image>``
    registered as the image token (as transformers' conversion does: ``Florence2Processor`` expands it),
    saved back; ``(tokenizer, tokens added in order)``."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(folder)
    vocab = tokenizer.get_vocab()
    added = [t for t in PROCESSOR_TOKENS if t not in vocab]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    tokenizer.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), extra_special_tokens={"image_token": IMAGE_TOKEN})
    tokenizer.save_pretrained(str(folder))
    return tokenizer, added


def grown_vocab(vocab_size: int, tokens: int) -> int:
    """The vocabulary after adding tokens: unchanged while they fit, else the next multiple of 64."""
    if tokens <= vocab_size:
        return vocab_size
    return math.ceil(tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass
class ImportResult:
    """What ``import_florence2`` did (printed by ``fvl import florence2``)."""

    out: Path
    layout: str
    report: Report | None = None
    ignored: list[str] = field(default_factory=list)
    added_tokens: int = 0
    vocab: tuple[int, int] | None = None  # (source rows, native rows)


def load_tokenizer(folder: Path):
    """A tokenizer from a folder of tokenizer files only (no config.json: it may describe remote code).
    Microsoft's folders name no tokenizer class; their processor declares BART's, which is used then."""
    from transformers import AutoTokenizer

    settings = folder / "tokenizer_config.json"
    data = json.loads(settings.read_text()) if settings.is_file() else {}
    if "tokenizer_class" not in data:
        settings.write_text(json.dumps({**data, "tokenizer_class": "BartTokenizer"}, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(str(folder))


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new output folder")


def import_florence2(src: str | Path, out: str | Path) -> ImportResult:
    """Write ``out``: a native Florence-2 folder (config.json, model.safetensors, tokenizer, preprocessor
    config without ``auto_map``) converted from the remote-layout folder ``src``; a native ``src`` is copied
    through (minus any ``*.py``)."""
    from transformers import Florence2ForConditionalGeneration

    src = require_dir(src, "Florence-2 checkpoint")
    out = Path(out).expanduser()
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output folder must differ from the source")
    config = read_config(src)
    kind = layout(config, src)
    check_out(out)
    if kind == "native":
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.py", "__pycache__"), dirs_exist_ok=True)
        return ImportResult(out, kind)

    native = native_config(config)
    weights = load_weights(src)
    out.mkdir(parents=True, exist_ok=True)
    try:  # a failure leaves no half-written folder behind
        copy_tokenizer(src, out)
        tokenizer, added = extend_tokenizer(out)
        vocab = native.kwargs["text_config"]["vocab_size"]
        rows = grown_vocab(vocab, len(tokenizer))
        model = Florence2ForConditionalGeneration(native.build(rows, tokenizer.image_token_id))
        state, report = remote_to_native(weights, model)
        model.load_state_dict(state, strict=True)
        model.save_pretrained(str(out))
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (src / name).is_file():
                without_auto_map(src / name, out / name)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if native.ignored:
        log.info("Florence-2 config keys without effect on the architecture: %s", ", ".join(native.ignored))
    return ImportResult(out, kind, report, native.ignored, len(added), (vocab, rows))
