"""Typed schema of ``model:`` in an experiment YAML. The docstrings are the reference for every key.

OmegaConf merges YAML onto these dataclasses, so an unknown key or a wrong type fails on load with the key's
full name; ``__post_init__`` checks the values that types cannot (enums, consistency), also on load.
Lists (``prompts``, ``features``, ``layers``) are replaced, not merged, by a later YAML or override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COMPONENTS = ("vision", "fusion", "projector", "llm")  # what a stage trains or freezes (and vision.<tower>)
INITS = ("pretrained", "random")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_MODES = ("auto", "full", "chunked", "fused")  # model.llm.loss, implemented in fvl.models.loss
PROMPT_PADDINGS = ("masked", "unmasked")  # model.vision.prompt_padding, in fvl.models.vision.florence2


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(choices)}")


@dataclass
class PromptConfig:
    """One Florence-2 prompt whose encoder output becomes a named feature.

    name: the feature's name (used by ``fusion.features``), e.g. ``caption``.
    text: a Florence-2 task token (``<OCR>``, expanded the way Florence-2 itself does) or free text.
    """

    name: str = "caption"
    text: str = "<DETAILED_CAPTION>"


def _paper_prompts() -> list[PromptConfig]:
    # The three prompts of the paper, named as the fusion configs refer to them.
    return [
        PromptConfig("caption", "<DETAILED_CAPTION>"),
        PromptConfig("ocr", "<OCR>"),
        PromptConfig("grounding", "<DENSE_REGION_CAPTION>"),
    ]


@dataclass
class TowerConfig:
    """One vision tower.

    name: registry key: ``florence2`` | ``clip`` | ``siglip``.
    init: ``pretrained`` loads ``path`` (a local folder); ``random`` builds ``arch`` with random weights.
    path: local folder of a pretrained checkpoint (Florence-2 in transformers' native format).
    tokenizer_path: florence2: folder of its tokenizer (defaults to ``path``; the built-in tiny one for random init).
    arch: keyword arguments of the transformers config used for random init (ignored when pretrained).
    image_size: square input resolution in pixels (768 for Florence-2).
    prompts: florence2: the prompts whose encoder outputs become named features (default: the paper's three).
    keep_pooled_token: florence2: keep the mean-pooled token transformers adds (577 tokens at 768 px, not 576).
    prompt_padding: florence2: how prompts shorter than the longest are fed to the encoder. The prompts are
      one batch, right-padded to the longest prompt's length. ``masked``: the pads are masked out of
      attention, so each prompt's features are those of the prompt alone (as Florence-2's own processor and
      model compute them for a single prompt). ``unmasked``: the pads stay in the sequence and are attended
      to, as the authors' Florence-VL feeds its hard-coded, padded prompt ids without an attention mask:
      imported Florence-VL checkpoints use it to reproduce their features exactly.
    layers: clip/siglip: hidden-state indices exposed as features named ``layer_{i}`` (LLaVA-1.5 uses -2).
    frozen_dtype: storage dtype of the tower's weights while a stage freezes them (``bfloat16`` halves their
      memory); weights that train are always float32 master weights (see ``set_trainable``), and compute runs
      in ``trainer.precision`` (``bf16-mixed``: autocast).
    compile: compile the tower's feature extraction with ``torch.compile`` (faster once compiled; the first
      steps pay the compilation).
    """

    name: str = "florence2"
    init: str = "random"
    path: str | None = None
    tokenizer_path: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    image_size: int = 768
    prompts: list[PromptConfig] = field(default_factory=_paper_prompts)
    keep_pooled_token: bool = False
    prompt_padding: str = "masked"
    layers: list[int] = field(default_factory=lambda: [-2])
    frozen_dtype: str = "float32"
    compile: bool = False

    def __post_init__(self) -> None:
        _check_choice(self.init, INITS, "model.vision.init")
        _check_choice(self.frozen_dtype, DTYPES, "model.vision.frozen_dtype")
        _check_choice(self.prompt_padding, PROMPT_PADDINGS, "model.vision.prompt_padding")
        names = [p.name for p in self.prompts]
        if len(set(names)) != len(names):
            raise ValueError(f"model.vision.prompts: duplicate names {names}")
        if "davit" in names:
            raise ValueError("model.vision.prompts: 'davit' is reserved for the projected DaViT tokens")
        if self.image_size <= 0:
            raise ValueError(f"model.vision.image_size must be positive, got {self.image_size}")
        if self.init == "random" and self.path:
            raise ValueError(
                f"model.vision.path={self.path} is set but model.vision.init=random builds a random tower and "
                "would ignore it: set model.vision.init=pretrained to load it (or drop the path)"
            )


GRID_RESAMPLING = ("area", "bilinear")


@dataclass
class VisionConfig(TowerConfig):
    """The vision tower: the keys of one tower (``TowerConfig``, above), and ``towers``.

    towers: more towers beside this one, by a name of your choosing: ``{siglip: {name: siglip, init:
      pretrained, path: DIR, image_size: 384}}``. Their features are named ``<name>.<feature>`` in
      ``model.fusion.features`` (``siglip.layer_-2``); this tower's keep their plain names (``davit``,
      ``caption``; ``florence2.davit`` names the same; a tower listed under this tower's own name is
      ignored). A tower is built only when the fusion names one of
      its features, so a preset can list the towers it offers and a fusion file picks
      (``experiments/fusion/florence2_siglip.yaml``). Each tower has its own resolution, normalisation,
      ``frozen_dtype`` and ``compile``; a stage freezes or trains each one as ``vision.<name>`` (this one
      is ``vision.<its name>``), all of them as ``vision``. Every image is decoded once, at the largest
      tower's size, and each tower's input is resized from it on the device (bicubic, antialiased) and
      normalised with that tower's mean and std. Grids that differ (SigLIP-384's 27 x 27, Florence-2-768's
      24 x 24) are brought to this tower's grid before the fusion, by ``grid_resampling``.
    grid_resampling: how another tower's token grid becomes this tower's: ``area`` (average pooling over
      each target cell's area, ``adaptive_avg_pool2d``: every source token counts, the default) or
      ``bilinear`` (interpolation at the target cells' centres).
    """

    towers: dict[str, TowerConfig] = field(default_factory=dict)
    grid_resampling: str = "area"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self.grid_resampling, GRID_RESAMPLING, "model.vision.grid_resampling")
        for key in self.towers:
            if not key.isidentifier():
                raise ValueError(f"model.vision.towers: {key!r} is not a name (letters, digits, _)")

    def all_towers(self) -> dict[str, TowerConfig]:
        """Every tower by its name: this one first (under ``name``), then ``towers``. One listed under this
        tower's own name is left out: ``<name>.<feature>`` names this tower's features (a preset whose main
        tower is SigLIP and that includes one offering a SigLIP beside it, say)."""
        return {self.name: self, **{k: t for k, t in self.towers.items() if k != self.name}}

    def in_use(self, features: list[str]) -> dict[str, TowerConfig]:
        """The towers a fusion of ``features`` needs: this one always, another when a feature is its."""
        used = {f.partition(".")[0] for f in features if "." in f}
        return {k: t for k, t in self.all_towers().items() if k == self.name or k in used}

    def decode_size(self, features: list[str]) -> int:
        """The resolution images are decoded at: the largest tower's in use (each input is resized from it)."""
        return max(t.image_size for t in self.in_use(features).values())


@dataclass
class FusionConfig:
    """How the named vision features become one token sequence.

    name: ``dbfusion`` (channel concat, the paper's) | ``token_concat`` (sequence concat) | ``avg_pool``
      (element-wise mean) | ``single_layer`` (one feature alone).
    features: names of the features to fuse, in order (``davit`` and the prompt names for florence2,
      ``layer_{i}`` for clip/siglip). Leave-one-out ablations are lists with one name fewer.
    """

    name: str = "dbfusion"
    features: list[str] = field(default_factory=lambda: ["davit", "caption", "ocr", "grounding"])

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("model.fusion.features must name at least one feature")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"model.fusion.features has duplicates: {list(self.features)}")
        if self.name == "single_layer" and len(self.features) != 1:
            raise ValueError(
                f"model.fusion: single_layer takes exactly one feature, got {list(self.features)}"
            )


@dataclass
class ProjectorConfig:
    """Maps fused vision features to the LLM's embedding width.

    name: ``mlp{N}x_gelu`` (N linear layers with GELU between; the paper's ``mlp3x_gelu``) | ``linear``.
    hidden_dim: width of the MLP's hidden layers (default: the LLM's hidden size, as in the paper).
    """

    name: str = "mlp3x_gelu"
    hidden_dim: int | None = None


@dataclass
class LLMConfig:
    """The causal language model (any transformers ``AutoModelForCausalLM``).

    init: ``pretrained`` loads ``path`` (a local folder); ``random`` builds ``arch`` with random weights.
    path: local folder of the LLM (e.g. Phi-3.5-mini-instruct).
    arch: random init: transformers config kwargs, with ``model_type`` (e.g. ``phi3``, ``llama``).
      ``vocab_size`` defaults to the tokenizer's size; special token ids always come from the tokenizer.
    frozen_dtype: storage dtype of the LLM's frozen weights (the whole LLM in a stage that freezes it, the base
      weights under LoRA; the compute dtype of NF4 weights); weights that train are always float32 master
      weights, and compute runs in ``trainer.precision`` (``bf16-mixed``: autocast).
    attn_implementation: ``sdpa`` | ``eager`` | ``flash_attention_2``.
    gradient_checkpointing: recompute LLM activations in backward to save memory.
    keep_activations: with ``gradient_checkpointing``, this many of the last decoder layers keep their
      activations instead (no recompute): spend memory that is left over on speed. A Phi-3.5 layer holds
      about 1 GiB of activations at 8 x 1.1k tokens.
    kernels: liger-kernel's Triton kernels in the decoder layers, any of ``rms_norm``, ``swiglu``, ``rope``
      (CUDA and ``fvl[gpu-kernels]`` only; ``fvl.models.kernels``).
    compile: compile each decoder layer with ``torch.compile`` (regional compilation, as for the tower: one
      compiled block serves every layer of its shape, class and parameter names stay, FSDP and gradient
      checkpointing still find the blocks). The first steps pay the compilation.
    trust_remote_code: run the Python code a pretrained LLM folder ships (``auto_map``) instead of
      transformers' own classes. Off: such code runs with your permissions; turn it on only for a folder you
      trust (a warning says so when it is on).
    quantization: ``none`` | ``nf4``: load the pretrained LLM's linear layers in 4-bit NF4 (bitsandbytes) -
      QLoRA, together with ``train.lora.enabled``.
    loss: how the training loss is computed: ``full`` (transformers builds the ``[batch, seq, vocab]``
      logits, 8 GB in float32 at 8 x 2k tokens x Llama 3's 128K vocabulary) | ``chunked`` (the output head
      and cross-entropy on supervised tokens only, in checkpointed chunks of 2**26 logits: never the full
      logits, same loss and gradients) | ``fused`` (liger-kernel's fused linear cross-entropy: CUDA, the
      ``fvl[gpu-kernels]`` extra) | ``auto``: fused when liger-kernel imports, the batch is on CUDA and the
      head is a plain linear layer; else chunked when batch x seq x vocab exceeds 2**26; else full.
    """

    init: str = "random"
    path: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    frozen_dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    keep_activations: int = 0
    kernels: list[str] = field(default_factory=list)
    compile: bool = False
    trust_remote_code: bool = False
    quantization: str = "none"
    loss: str = "auto"

    def __post_init__(self) -> None:
        _check_choice(self.loss, LOSS_MODES, "model.llm.loss")
        if self.keep_activations < 0:
            raise ValueError("model.llm.keep_activations must be >= 0")
        unknown = [k for k in self.kernels if k not in ("rms_norm", "swiglu", "rope")]
        if unknown:
            raise ValueError(f"model.llm.kernels: unknown {unknown}; known: rms_norm, swiglu, rope")
        _check_choice(self.init, INITS, "model.llm.init")
        _check_choice(self.quantization, ("none", "nf4"), "model.llm.quantization")
        if self.quantization != "none" and self.init != "pretrained":
            raise ValueError(
                "model.llm.quantization=nf4 quantizes pretrained weights: set model.llm.init=pretrained"
            )
        _check_choice(self.frozen_dtype, DTYPES, "model.llm.frozen_dtype")
        if self.init == "random" and "model_type" not in self.arch and self.arch:
            raise ValueError("model.llm.arch needs a model_type (e.g. phi3, llama) for random init")


@dataclass
class TextConfig:
    """Tokenizer and chat template.

    tokenizer_path: the LLM tokenizer's folder (default: ``llm.path``; the built-in tiny one for random init).
    image_token: the placeholder added to the tokenizer; each occurrence in a prompt becomes one image.
    template: a registered chat template: ``plain`` (stage 1 captions) | ``phi3`` | ``llama3``.
    max_length: longest tokenized sample; a longer one is truncated only if supervision survives.
    min_text_tokens: text budget a one-image sample needs beside its image tokens; a config whose image
      tokens leave less than this under ``max_length`` is an error before anything is built (every sample
      would be skipped; ``fvl.models.check``).
    """

    tokenizer_path: str | None = None
    image_token: str = "<image>"
    template: str = "phi3"
    max_length: int = 2048
    min_text_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ValueError("model.text.max_length must be positive")


@dataclass
class ModelConfig:
    """The composed Florence-VL model: vision tower -> fusion -> projector -> LLM.

    preset: informational name of the preset this config came from (logged as a tag).
    """

    preset: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    text: TextConfig = field(default_factory=TextConfig)


def plain_dict(value: Any) -> dict[str, Any]:
    """A config mapping (DictConfig or dict) as plain Python containers, as transformers configs need."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    return {k: plain_dict(v) if isinstance(v, dict) else v for k, v in dict(value).items()}


def check_arch_keys(config_cls: type, arch: dict[str, Any], key: str) -> None:
    """transformers configs keep unknown kwargs silently; a typo or a leftover key from another
    architecture (after a YAML merge) must fail instead of building a different model."""
    known = set(config_cls().to_dict()) | {"model_type"}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ValueError(f"{key}: unknown keys for {config_cls.__name__}: {unknown}")
