"""The authors' Florence-VL checkpoints (their LLaVA fork) -> one fvl checkpoint.

Their layout, as their code writes and reads it (JiuhaiChen/Florence-VL, read in a public fork of it:
``llava/model/llava_arch.py``, ``language_model/llava_phi3.py``, ``multimodal_encoder/florence_encoder.py``,
``multimodal_projector/builder.py``, ``train/train.py``):
- ``config.json``: the LLM's config with ``model_type`` ``llava_phi`` (Phi-3.5-mini) or ``llava_llama``
  (Llama 3) and LLaVA's ``mm_*`` fields (``mm_vision_tower``: the Florence-2 folder; ``mm_projector_type``:
  ``mlp3x_gelu``; ``mm_hidden_size``: 1024, hard-coded, the width of one feature; ...);
- the weights of the whole ``LlavaPhiForCausalLM``: the LLM's own keys (``model.layers.*``, ``lm_head``), the
  projector under ``model.mm_projector.encoder_mlp.*`` (``DualMLPProjector``: ``encoder_mlp.0`` a Linear,
  ``encoder_mlp.{i}.1`` the Linear after each GELU) and, since the tower is a submodule, Florence-2 itself
  under ``model.vision_tower.vision_tower.*`` in the remote-code layout;
- ``vision_tower/``: the Florence-2 they trained in stage 1 (``safe_save_model_for_hf_trainer``): its config
  and processor files and ``pytorch_model.bin``, a save of ``named_parameters()`` (so no buffers, tied
  tensors once).

How they compute image features (``florence_encoder.py`` + ``llava_arch.py``): Florence-2 runs on the image
with three hard-coded prompt id rows (``TASK_IDS``: ``<DETAILED_CAPTION>``, ``<OCR>``,
``<DENSE_REGION_CAPTION>`` expanded, each ``<s> text </s>``, right-padded with ``<pad>`` to the longest, 14)
and no attention mask, so the encoder attends to the pads; the projector takes ``cat(image_features,
encoder_last_hidden_state)`` along channels: the DaViT tokens, then the three prompts' encoder outputs in
that order. fvl's DBFusion order ``[davit, caption, ocr, grounding]`` is the same, so no projector columns
move; ``model.vision.prompt_padding=unmasked`` reproduces the attended pads. The Florence-2 half goes
through ``fvl.convert.florence2`` (remote -> native keys) and then onto fvl's tower
(``vision.davit`` / ``vision.image_projection`` / ``vision.encoder``); the decoder, which Florence-VL never
runs, is dropped.

The Florence-2 that returns ``(generated_ids, image_feature, encoder_last_hidden_state)`` is their own
modification of modeling_florence2.py, shipped in their vision-tower checkpoint, not in the GitHub code:
which image tokens it passes on is taken from fvl's reading of the paper (576: the pooled token dropped,
``keep_pooled_token=false``); set ``model.vision.keep_pooled_token=true`` if theirs passes 577.

The written config builds every part from its architecture (``init: random``: no other weights are read,
the checkpoint holds them all) and names the two tokenizers copied next to the checkpoint by absolute path.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fvl.convert.files import copy_tokenizer, load_weights, read_config, require_dir, weight_files
from fvl.convert.florence2 import (
    NativeConfig,
    check_out,
    extend_tokenizer,
    grown_vocab,
    layout,
    native_config,
    remote_to_native,
)
from fvl.convert.keys import Report, Rule, convert, grow_rows

log = logging.getLogger(__name__)

# their model_type -> (transformers model_type of the LLM, fvl preset, fvl chat template)
MODEL_TYPES = {
    "llava_phi": ("phi3", "florence_vl_3b", "phi3"),
    "llava_llama": ("llama", "florence_vl_8b", "llama3"),
}
VISION_PREFIX = "model.vision_tower.vision_tower."
PROMPTS = [("caption", "<DETAILED_CAPTION>"), ("ocr", "<OCR>"), ("grounding", "<DENSE_REGION_CAPTION>")]
FEATURES = ["davit", "caption", "ocr", "grounding"]
# florence_encoder.py's prompt ids (Florence-2's BART tokenizer; 0 <s>, 2 </s>, 1 <pad>)
TASK_IDS = [
    [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2, 1],
    [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2, 1, 1, 1, 1],
    [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
]
IMAGE_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # fvl's Florence-2 default (and Florence-2's)
# config keys of the fork (LLaVA's) that are not the LLM's, besides mm_*
LLAVA_KEYS = (
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "unfreeze_mm_vision_tower",
    "tune_vision_model",
    "tune_entire_model",
)
# generic config fields that are not architecture (token ids come from the tokenizer in fvl)
NOT_ARCH = (
    "_name_or_path",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "id2label",
    "label2id",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _projector_key(match: re.Match[str]) -> str:
    return f"projector.{2 * int(match.group(1))}.{match.group(2)}"  # fvl: Linear, GELU, Linear, GELU, ...


# their keys (LLM and projector) -> fvl's
MAIN_RULES = [
    Rule(r"model\.mm_projector\.encoder_mlp\.0\.(weight|bias)", r"projector.0.\1"),
    Rule(r"model\.mm_projector\.encoder_mlp\.(\d+)\.1\.(weight|bias)", _projector_key),
    Rule(r"model\.embed_tokens\.weight", "llm.model.embed_tokens.weight", grow_rows),
    Rule(r"lm_head\.weight", "llm.lm_head.weight", grow_rows),
    Rule(r"(model\.(?!mm_projector\.|vision_tower\.|image_newline).+)", r"llm.\1"),
]
# their Florence-2, remote layout: the decoder's output bias is unused in Florence-VL, whatever its value
VISION_OVERRIDES = [
    Rule(
        r"language_model\.final_logits_bias",
        None,
        why="the decoder's output bias (Florence-VL never decodes)",
    )
]
# native Florence-2 keys -> fvl's tower (fvl.models.vision.florence2.Florence2Tower)
TOWER_RULES = [
    Rule(r"model\.vision_tower\.(.+)", r"vision.davit.\1"),
    Rule(r"model\.multi_modal_projector\.(.+)", r"vision.image_projection.\1"),
    Rule(r"model\.language_model\.shared\.weight", "vision.encoder.embed_tokens.weight"),
    Rule(r"model\.language_model\.encoder\.embed_tokens\.weight", None, why="the shared table again (tied)"),
    Rule(r"model\.language_model\.encoder\.(.+)", r"vision.encoder.\1"),
    Rule(r"model\.language_model\.decoder\..+", None, why="Florence-2's decoder (Florence-VL never runs it)"),
    Rule(r"lm_head\.weight", None, why="Florence-2's output head (Florence-VL never runs it)"),
]


@dataclass
class ImportResult:
    """What ``import_florence_vl`` did (printed by ``fvl import florence-vl``)."""

    checkpoint: Path
    preset: str
    report: Report
    notes: list[str] = field(default_factory=list)


def find_vision_tower(src: Path, config: dict[str, Any], given: str | Path | None) -> Path:
    """The Florence-2 folder: ``given``, else ``SRC/vision_tower``, else ``mm_vision_tower`` if local."""
    if given:
        return require_dir(given, "Florence-VL vision tower (--vision-tower)")
    named = config.get("mm_vision_tower") or config.get("vision_tower")
    for candidate in (src / "vision_tower", Path(str(named)).expanduser() if named else None):
        if candidate is not None and (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{src}: no Florence-2 vision tower folder: neither {src / 'vision_tower'} nor mm_vision_tower="
        f"{named!r} holds a config.json; pass --vision-tower DIR"
    )


def check_llava_config(config: dict[str, Any], src: Path) -> tuple[int, list[str]]:
    """The projector depth, and notes on LLaVA settings fvl reproduces differently; settings it cannot
    reproduce are errors."""
    projector = config.get("mm_projector_type", "linear")
    match = re.fullmatch(r"mlp(\d+)x_gelu", str(projector))
    if not match:
        raise ValueError(
            f"{src}: mm_projector_type={projector!r}: Florence-VL's DBFusion projector is mlp{{N}}x_gelu "
            "(their linear projector cannot take the fused features)"
        )
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(
            f"{src}: mm_patch_merge_type={config['mm_patch_merge_type']!r}: fvl supports flat only"
        )
    if config.get("mm_use_im_start_end", False):
        raise ValueError(f"{src}: mm_use_im_start_end=true: fvl has no image start/end tokens")
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square"):
        raise ValueError(f"{src}: image_aspect_ratio={aspect!r}: fvl resizes with pad or square only")
    notes = [
        f"image_aspect_ratio={aspect}: run fvl with resize mode {aspect} (fvl's inference default is pad)",
        "mm_vision_select_layer / mm_vision_select_feature: not read by their Florence-2 tower (ignored)",
    ]
    if config.get("mm_use_im_patch_token", False):
        notes.append("mm_use_im_patch_token=true: their loader adds an unused <im_patch> token (ignored)")
    return int(match.group(1)), notes


def llm_arch(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """``model.llm.arch`` for the LLM: the config through transformers' own class (which turns older
    fields such as ``rope_scaling`` into today's), its architecture fields only."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = {
        k: v
        for k, v in config.items()
        if k != "model_type" and not k.startswith("mm_") and k not in LLAVA_KEYS
    }
    native = cls(**fields).to_dict()
    known = set(cls().to_dict())
    return {"model_type": model_type} | {
        k: v for k, v in native.items() if k in known and k not in NOT_ARCH and k != "model_type"
    }


def storage_dtype(tensors: list[torch.Tensor]) -> str:
    """The one floating dtype of ``tensors`` as a ``frozen_dtype`` (float32 when they mix)."""
    kinds = {t.dtype for t in tensors if t.is_floating_point()}
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    return names.get(next(iter(kinds)), "float32") if len(kinds) == 1 else "float32"


def image_settings(vision_dir: Path, default_size: int) -> int:
    """The tower's resolution from its processor settings; their mean and std must be fvl's defaults."""
    path = vision_dir / "preprocessor_config.json"
    if not path.is_file():
        return default_size
    data = json.loads(path.read_text())
    mean, std = data.get("image_mean"), data.get("image_std")
    if mean is not None and std is not None:
        close = all(
            abs(a - b) < 1e-6 for a, b in zip([*mean, *std], [*IMAGE_STATS[0], *IMAGE_STATS[1]], strict=True)
        )
        if not close:
            raise ValueError(f"{path}: image_mean/std {mean}/{std} differ from Florence-2's {IMAGE_STATS}")
    size = data.get("size") or data.get("crop_size") or {}
    if isinstance(size, dict) and "height" in size:
        if size.get("width", size["height"]) != size["height"]:
            raise ValueError(f"{path}: non-square size {size}")
        return int(size["height"])
    return default_size


def _compose(first: Report, second: Report, prefix: str) -> Report:
    """One report for two conversions in a row (source -> native -> fvl), keyed by the first's sources."""
    out = Report()
    source_of = {native: src for src, native in first.used.items()}
    for src, native in first.used.items():
        if native in second.used:
            out.used[prefix + src] = second.used[native]
        else:
            out.dropped[prefix + src] = second.dropped[native]
    out.dropped.update({prefix + k: why for k, why in first.dropped.items()})
    for native, final in second.used.items():
        if native in first.tied:
            out.tied[final] = prefix + source_of[first.tied[native]]
        elif native in first.kept:
            out.kept[final] = first.kept[native]
    out.tied.update(second.tied)
    out.kept.update(second.kept)
    return out


def fvl_config(
    config: dict[str, Any],
    vision_dir: Path,
    out: Path,
    depth: int,
    vision_dtype: str,
    llm_dtype: str,
    florence_tokenizer: Any,
) -> tuple[Any, NativeConfig]:
    """The fvl model config of the import: the preset of their LLM, every part built from its architecture.
    Florence-2's vocabulary grows for the tokens ``extend_tokenizer`` added (``<image>``), as in
    ``fvl import florence2``, so that ``fvl export`` writes a working native Florence-2."""
    from fvl.config import load, typed

    llm_type, preset, template = MODEL_TYPES[config["model_type"]]
    cfg = load(preset).model
    native = native_config(read_config(vision_dir))
    vision = {
        "init": "random",
        "path": None,
        "tokenizer_path": str((out / "florence2_tokenizer").resolve()),
        "image_size": image_settings(vision_dir, int(cfg.vision.image_size)),
        "prompts": [{"name": n, "text": t} for n, t in PROMPTS],
        "keep_pooled_token": False,
        "prompt_padding": "unmasked",
        "frozen_dtype": vision_dtype,
    }
    text = {
        "tokenizer_path": str((out / "llm_tokenizer").resolve()),
        "template": template,
        "max_length": int(config.get("tokenizer_model_max_length") or cfg.text.max_length),
    }
    merged = {
        "preset": preset,
        "vision": vision,
        "fusion": {"name": "dbfusion", "features": FEATURES},
        "projector": {"name": f"mlp{depth}x_gelu", "hidden_dim": None},
        "llm": {"init": "random", "path": None, "frozen_dtype": llm_dtype},
        "text": text,
    }
    # whole architectures, not merged into the preset's (whose sizes are the real ones)
    text_arch = {k: v for k, v in native.kwargs["text_config"].items() if k != "model_type"}
    text_arch["vocab_size"] = grown_vocab(text_arch["vocab_size"], len(florence_tokenizer))
    merged["vision"]["arch"] = {
        "vision_config": native.kwargs["vision_config"],
        "text_config": text_arch,
        "image_token_id": florence_tokenizer.image_token_id,
    }
    merged["llm"]["arch"] = llm_arch(config, llm_type)
    # arch dicts replace the preset's (a merge would keep its real sizes' keys)
    cfg.vision.arch, cfg.llm.arch = {}, {}
    return typed(type(cfg), cfg, merged, source="imported Florence-VL config"), native


def prompt_note(tokenizer) -> str:
    """Whether fvl's prompt rows (``Florence2Tower``'s: ``<s> text </s>`` right-padded with ``<pad>``) are
    their hard-coded ``TASK_IDS``: they are with Florence-2's BART tokenizer."""
    from fvl.assets.florence2_arch import TASK_PROMPTS

    rows = [
        [tokenizer.bos_token_id, *tokenizer(TASK_PROMPTS[t], add_special_tokens=False).input_ids]
        + [tokenizer.eos_token_id]
        for _, t in PROMPTS
    ]
    width = max(len(r) for r in rows)
    rows = [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]
    if rows == TASK_IDS:
        return "fvl's prompt ids equal their hard-coded task ids"
    return "fvl's prompt ids differ from their hard-coded task ids (expected only with another tokenizer)"


def split_weights(
    src: Path, vision_dir: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str, dict[str, torch.Tensor]]:
    """``(main, vision, vision prefix, copy)``: the LLM and projector tensors; Florence-2's (from the main
    state dict when it holds them: their loader loads it last, so it wins; else from ``vision_tower/``);
    the prefix the report gives Florence-2's keys; and ``vision_tower/``'s tensors when they are a copy."""
    main = load_weights(src)
    vision = {k[len(VISION_PREFIX) :]: v for k, v in main.items() if k.startswith(VISION_PREFIX)}
    main = {k: v for k, v in main.items() if not k.startswith(VISION_PREFIX)}
    if not vision:
        return main, load_weights(vision_dir), "vision_tower/", {}
    return main, vision, VISION_PREFIX, load_weights(vision_dir) if weight_files(vision_dir) else {}


def convert_weights(
    model: torch.nn.Module,
    florence_config: Any,
    parts: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str, dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], Report]:
    """Every tensor of the fvl ``model``: the LLM and projector by ``MAIN_RULES``; Florence-2 by the remote
    -> native mapping (onto ``florence_config``'s model), then ``TOWER_RULES``. One report, keyed by the
    source's names."""
    from transformers import Florence2ForConditionalGeneration

    main, vision, prefix, copy = parts
    target = model.state_dict()
    florence = Florence2ForConditionalGeneration(florence_config)  # its state dict: the native contract
    native_state, first = remote_to_native(vision, florence, VISION_OVERRIDES)
    del florence
    tower = {k: v for k, v in target.items() if k.startswith("vision.")}
    tower_state, second = convert(native_state, TOWER_RULES, tower, "Florence-2 native -> fvl tower")
    rest = {k: v for k, v in target.items() if not k.startswith("vision.")}
    state, report = convert(main, MAIN_RULES, rest, "Florence-VL -> fvl")
    vision_report = _compose(first, second, prefix)
    for mine, theirs in zip(
        (report.used, report.dropped, report.tied, report.kept),
        (vision_report.used, vision_report.dropped, vision_report.tied, vision_report.kept),
        strict=True,
    ):
        mine.update(theirs)
    for key, tensor in copy.items():
        same = key in vision and torch.equal(tensor, vision[key])
        report.dropped[f"vision_tower/{key}"] = (
            "a copy of the main state dict's vision tower"
            if same
            else "differs from the main state dict's vision tower, which their loader loads last (wins)"
        )
    return {**tower_state, **state}, report


def import_florence_vl(
    src: str | Path, out: str | Path, vision_tower: str | Path | None = None
) -> ImportResult:
    """Write ``out``: ``model.safetensors`` (an fvl checkpoint, ``save_checkpoint``'s format), the LLM's
    tokenizer (``llm_tokenizer/``), Florence-2's (``florence2_tokenizer/``) and ``fvl_import.json`` (every
    key's fate), from the authors' Florence-VL folder ``src``."""
    from fvl.models import FlorenceVL, save_checkpoint
    from fvl.models.checkpoint import model_config as validated

    src = require_dir(src, "Florence-VL checkpoint")
    out = Path(out).expanduser()
    config = read_config(src)
    if config.get("model_type") not in MODEL_TYPES or "mm_vision_tower" not in config:
        raise ValueError(
            f"{src}: config.json has model_type {config.get('model_type')!r}"
            f"{'' if 'mm_vision_tower' in config else ' and no mm_vision_tower'}: not a Florence-VL checkpoint "
            f"(expected model_type {' or '.join(MODEL_TYPES)} with LLaVA's mm_* fields)"
        )
    depth, notes = check_llava_config(config, src)
    vision_dir = find_vision_tower(src, config, vision_tower)
    if layout(read_config(vision_dir), vision_dir) != "remote":
        raise ValueError(f"{vision_dir}: expected Florence-2 in the remote-code layout their code saves")
    check_out(out)
    parts = split_weights(src, vision_dir)
    main, vision = parts[0], parts[1]
    llm_dtype = storage_dtype([v for k, v in main.items() if not k.startswith("model.mm_projector.")])

    out.mkdir(parents=True, exist_ok=True)
    try:  # a failure leaves no half-written folder behind
        copy_tokenizer(src, out / "llm_tokenizer")
        copy_tokenizer(vision_dir, out / "florence2_tokenizer")
        florence_tokenizer, _ = extend_tokenizer(out / "florence2_tokenizer")  # as fvl import florence2
        notes.append(prompt_note(florence_tokenizer))
        vision_dtype = storage_dtype(list(vision.values()))
        cfg, native = fvl_config(config, vision_dir, out, depth, vision_dtype, llm_dtype, florence_tokenizer)
        model = FlorenceVL(validated(cfg))
        arch = cfg.vision.arch
        florence_config = native.build(arch["text_config"]["vocab_size"], arch["image_token_id"])
        state, report = convert_weights(model, florence_config, parts)
        differing = [k for k, why in report.dropped.items() if why.startswith("differs")]
        if differing:
            log.warning("%d vision_tower/ tensors differ from the main state dict's (used)", len(differing))
            notes.append(f"{len(differing)} vision_tower/ tensors differ from the main state dict's (used)")
        model.load_state_dict(state, strict=True)
        checkpoint = save_checkpoint(
            model, out / "model.safetensors", extra_metadata={"fvl_imported_from": f"florence-vl {src}"}
        )
        record = {"source": str(src), "vision_tower": str(vision_dir), "preset": cfg.preset, "notes": notes}
        record |= {"ignored_florence2_config": native.ignored, **vars(report)}
        (out / "fvl_import.json").write_text(json.dumps(record, indent=1))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return ImportResult(checkpoint, cfg.preset, report, notes)
