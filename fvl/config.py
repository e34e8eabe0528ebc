"""Experiment configs: YAML files composed with ``include:``, merged onto a typed schema, validated on load.

``load(path, overrides)`` is the one entry point. A YAML may start with ``include: [other.yaml, ...]``
(paths relative to that file, merged in order, then the file itself on top), so an ablation states only
what differs from its base. Overrides are OmegaConf dot-lists: ``model.fusion.name=avg_pool``.
Errors name the offending key and the file (or override) it came from, before anything is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fvl.data.config import DataConfig
from fvl.models.config import ModelConfig
from fvl.train.config import TrackingConfig, TrainConfig, TrainerConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key and its source."""


STAGES = ("pretrain", "finetune", "align")


@dataclass
class ExperimentConfig:
    """An fvl experiment.

    name: experiment name (run folder and MLflow run names start with it).
    stage: ``pretrain`` (everything trains, template plain, square images) | ``finetune`` (projector + LLM,
      chat template, padded images) | ``align`` (projector only).
    seed: global random seed.
    output_dir: where run folders (checkpoints, resolved config) are written.
    init_from: weights to start from: a ``.safetensors``/``.ckpt`` path, ``mlflow:RUN_ID`` or ``latest``
      (the newest checkpoint of a pretrain run under ``output_dir``); empty: the model's own init.
    resume: continue a run exactly (step, optimizer, schedule): a ``.ckpt`` path or ``last`` (the newest
      run of this name and stage).
    model / data / train / trainer / tracking: see their classes.
    """

    name: str = "fvl"
    stage: str = "pretrain"
    seed: int = 0
    output_dir: str = "runs"
    init_from: str | None = None
    resume: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.model.llm.quantization != "none" and not self.train.lora.enabled:
            raise ValueError(
                "model.llm.quantization=nf4 (QLoRA) needs train.lora.enabled=true: 4-bit weights cannot train"
            )
        if self.train.global_batch_size % self.data.batch_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"data.batch_size={self.data.batch_size}"
            )


def resolve_path(path: str | Path) -> Path:
    """A YAML path, or a preset name such as ``tiny`` (looked up in ``experiments/models/``)."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = EXPERIMENTS_DIR / "models" / f"{p.name}.yaml"
    if preset.exists():
        return preset
    known = sorted(q.stem for q in (EXPERIMENTS_DIR / "models").glob("*.yaml"))
    raise ConfigError(f"{path!r} is neither a YAML file nor a model preset ({', '.join(known)})")


def _read_with_includes(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML layers of ``path`` in merge order: its includes (recursively), then itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    layers: list[tuple[Path, DictConfig]] = []
    for inc in includes:
        inc_path = (path.parent / str(inc)).resolve()
        if not inc_path.exists():
            raise ConfigError(f"{path}: include {inc!r} not found (looked for {inc_path})")
        layers.extend(_read_with_includes(inc_path, (*seen, path)))
    layers.append((path, raw))
    return layers


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{source}: invalid key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None


def validate(cfg: DictConfig, source: str = "config") -> None:
    """Run the schema's value checks (``__post_init__``) and reject unresolved mandatory values."""
    try:
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: key {getattr(e, 'full_key', '?')!r}: {e.msg}") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(
    path: str | Path | None = None, overrides: Sequence[str] = (), layers: Sequence[str | Path] = ()
) -> DictConfig:
    """Load an experiment config: schema defaults <- YAML layers <- extra ``layers`` <- dot-list overrides,
    then validate.

    ``path`` may be a YAML file or a model preset name (``tiny``, ``florence_vl_3b``, ``florence_vl_8b``);
    ``None`` gives the schema defaults. ``layers`` are more YAML files merged on top (a sweep's fusion
    variant, say). Returns a typed ``DictConfig`` (assignments are type-checked too).
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    sources = []
    files = [resolve_path(path)] if path is not None else []
    files += [resolve_path(p) for p in layers]
    for file in files:
        for layer_path, layer in _read_with_includes(file):
            cfg = _merge(cfg, layer, str(layer_path))
            sources.append(str(layer_path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    validate(cfg, sources[-1] if sources else "config")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what a run records as its artifact)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
