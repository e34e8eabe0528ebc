"""fvl models out: ``export`` writes a folder whose parts load with plain transformers; ``load_exported`` reads
one back into fvl.

The folder: ``llm/`` (``AutoModelForCausalLM`` + tokenizer with the image token), ``vision/`` (the tower's own
class, e.g. ``Florence2ForConditionalGeneration``, and its preprocessing: ``AutoImageProcessor`` and
``AutoProcessor`` load there), ``vision_<key>/`` the same for each tower beside it (``model.vision.towers``),
``projector.safetensors`` (projector and fusion weights) and ``fvl_config.yaml``.

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

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fvl.config import dump_yaml, plain, read_yaml
from fvl.models.checkpoint import model_config
from fvl.models.florence_vl import FlorenceVL

log = logging.getLogger(__name__)

CONFIG_FILE = "fvl_config.yaml"
PROJECTOR_FILE = "projector.safetensors"


def export(model: FlorenceVL, out_dir: str | Path) -> Path:
    """Write the transformers-loadable folder described in this module's docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(out / "llm")
    model.tokenizer.save_pretrained(out / "llm")
    cfg = plain(model.cfg)
    for key, tower in model.all_towers().items():
        main = tower is model.vision
        folder = "vision" if main else f"vision_{key}"
        tower.save_pretrained(out / folder)
        save_image_processor(tower, model.cfg.vision.all_towers()[key].name, out / folder)
        entry = cfg["vision"] if main else cfg["vision"]["towers"][key]
        entry |= {"init": "pretrained", "path": folder, "tokenizer_path": None}
    heads = {f"projector.{k}": v for k, v in model.projector.state_dict().items()}
    heads |= {f"fusion.{k}": v for k, v in model.fusion.state_dict().items()}
    save_file({k: v.contiguous().cpu() for k, v in heads.items()}, str(out / PROJECTOR_FILE))
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


def save_image_processor(tower, kind: str, folder: str | Path) -> None:
    """Write a tower's preprocessing beside its weights (``preprocessor_config.json``, which fvl also reads
    back for the mean and std); for Florence-2 also ``Florence2Processor``'s files, so that
    ``AutoProcessor.from_pretrained(folder)`` gives a working processor. ``kind``: the tower's registry name."""
    import transformers

    folder = Path(folder)
    name = IMAGE_PROCESSORS.get(kind)
    if name is None:
        log.warning("vision tower %r: no transformers image processor known, none exported", kind)
        return
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
    florence = kind == "florence2"
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
    for tower in cfg["vision"].get("towers", {}).values():
        if (
            tower.get("path") and tower.get("init") == "pretrained"
        ):  # exported (in use); the others as they were
            tower["path"] = str(folder / tower["path"])
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
