"""Experiment configs: YAML files composed with ``include:``, merged onto a typed schema, validated on load.

``load(path, overrides)`` is the one entry point. A YAML may start with ``include: [other.yaml, ...]``
(paths relative to that file, merged in order, then the file itself on top), so an ablation states only
what differs from its base. Overrides are OmegaConf dot-lists: ``model.fusion.name=avg_pool``.
``stage: NAME`` (a string, in a YAML or an override) stands for ``experiments/stages/NAME.yaml``.
Errors name the offending key and the file (or override) it came from, before anything is built. Each
schema checks only its own fields; ``fvl.config.check`` checks the sections against each other. OmegaConf
stays inside this package: ``load`` returns the typed ``ExperimentConfig``.

Names resolve through ``fvl.util.resources``: ``tiny`` is ``experiments/models/tiny.yaml``, ``pretrain`` is
``experiments/pretrain.yaml``, looked up in the working directory's ``experiments/`` first, then in the
copies that ship inside the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fvl.config.check import check
from fvl.config.data import DataConfig
from fvl.config.eval import EvalConfig
from fvl.config.model import ModelConfig
from fvl.config.stage import STAGES_SUBDIR, StageConfig
from fvl.config.tracking import TrackingConfig
from fvl.config.train import TrainConfig, TrainerConfig
from fvl.config.typed import ConfigError
from fvl.util import resources


@dataclass
class ExperimentConfig:
    """An fvl experiment.

    name: experiment name (run folder and MLflow run names start with it).
    stage: what the stage trains and how its data looks (``StageConfig``); in YAML or an override a plain
      name (``stage: finetune``) stands for ``experiments/stages/NAME.yaml``.
    seed: global random seed.
    output_dir: where run folders (checkpoints, resolved config) are written.
    init_from: weights to start from: a ``.safetensors``/``.ckpt`` path, a run folder, ``mlflow:RUN_ID`` or
      ``latest`` (the newest checkpoint of a run of ``stage.init_stage`` under ``output_dir``); empty: the
      model's own init.
    resume: continue a run exactly (step, optimizer, schedule): a ``.ckpt`` path or ``last`` (the newest
      run of this name and stage).
    model / data / train / trainer / tracking / eval: see their classes.
    """

    name: str = "fvl"
    stage: StageConfig = field(default_factory=StageConfig)
    seed: int = 0
    output_dir: str = "runs"
    init_from: str | None = None
    resume: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_label(self) -> str:
        """``{name}-{stage}``: the prefix of run folders and the default MLflow run name."""
        return f"{self.name}-{self.stage.name}"

    @property
    def validates(self) -> bool:
        """Whether the run has a validation split."""
        return self.data.val_samples > 0

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro batches per optimizer step so that ``train.global_batch_size`` holds on ``world_size`` devices."""
        per_step = self.data.batch_size * world_size
        if self.train.global_batch_size % per_step:
            fits = [
                b
                for b in range(self.data.batch_size, 0, -1)
                if self.train.global_batch_size % (b * world_size) == 0
            ]
            hint = (
                f"set data.batch_size={fits[0]} (the largest micro batch that fits)"
                if fits
                else (f"use a train.global_batch_size that is a multiple of {world_size}")
            )
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"data.batch_size={self.data.batch_size} x {world_size} device(s): {hint}"
            )
        return self.train.global_batch_size // per_step


def resolve_path(path: str | Path) -> Path:
    """A YAML path, an experiment name (``pretrain``: ``experiments/pretrain.yaml``) or a model preset name
    (``tiny``: ``experiments/models/tiny.yaml``). A path under ``experiments/`` that does not exist here is
    looked up among the shipped experiments, so the README's commands run from any directory."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        if p.exists():
            return p
        parts = p.parts
        if "experiments" in parts:
            shipped = resources.find("experiments", Path(*parts[parts.index("experiments") + 1 :]))
            if shipped is not None:
                return shipped
        raise ConfigError(f"config file not found: {p}")
    for relative in (f"{p.name}.yaml", f"models/{p.name}.yaml"):
        found = resources.find("experiments", relative)
        if found is not None:
            return found
    known = resources.names("experiments") + resources.names("experiments", "models")
    raise ConfigError(
        f"{path!r} is neither a YAML file nor an experiment or model preset ({', '.join(known)})"
    )


def stage_path(name: str) -> Path:
    """``experiments/stages/NAME.yaml`` (the working directory's, else the shipped one)."""
    found = resources.find("experiments", f"{STAGES_SUBDIR}/{name}.yaml")
    if found is None:
        known = ", ".join(resources.names("experiments", STAGES_SUBDIR))
        raise ConfigError(
            f"stage={name!r}: no stage named {name!r} (known: {known}); define one in experiments/{STAGES_SUBDIR}/"
        )
    return found


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
    includes = list(raw.pop("include", None) or [])
    if isinstance(includes, str):
        includes = [includes]
    layers: list[tuple[Path, DictConfig]] = []
    for inc in includes:
        inc_path = (path.parent / str(inc)).resolve()
        if not inc_path.exists():
            raise ConfigError(f"{path}: include {inc!r} not found (looked for {inc_path})")
        layers.extend(_read_with_includes(inc_path, (*seen, path)))
    stage = raw.get("stage")
    if isinstance(stage, str):  # ``stage: NAME`` stands for the stage's own YAML, merged here
        raw.pop("stage")
        layers.extend(_read_with_includes(stage_path(stage), (*seen, path)))
    layers.append((path, raw))
    return layers


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{source}: invalid key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None


def _typed(cfg: DictConfig, source: str) -> ExperimentConfig:
    """The typed config of a merged ``DictConfig``: each schema's own value checks (``__post_init__``) run
    here; unresolved mandatory values are rejected."""
    try:
        exp = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: key {getattr(e, 'full_key', '?')!r}: {e.msg}") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    derive(exp)
    try:
        check(exp)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return exp  # type: ignore[return-value]


def derive(exp: ExperimentConfig) -> None:
    """Settings the stage decides, written where the rest of fvl reads them (idempotent)."""
    if exp.stage.template:
        exp.model.text.template = exp.stage.template


def load(
    path: str | Path | None = None, overrides: Sequence[str] = (), layers: Sequence[str | Path] = ()
) -> ExperimentConfig:
    """Load an experiment config: schema defaults <- YAML layers <- extra ``layers`` <- dot-list overrides,
    then each section's own checks and the cross-section ones (``fvl.config.check``).

    ``path`` may be a YAML file or a model preset name (``tiny``, ``florence_vl_3b``, ``florence_vl_8b``);
    ``None`` gives the schema defaults. ``layers`` are more YAML files merged on top (a sweep's fusion
    variant, say). Returns the typed ``ExperimentConfig``. Loading reads YAML files only: it builds no model
    and opens no checkpoint or tower folder (``fvl.models.check`` does, before a model is built).
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
        key, value = item.split("=", 1)
        if key.strip() == "stage":  # stage=NAME: the stage's YAML
            for layer_path, layer in _read_with_includes(stage_path(value.strip())):
                cfg = _merge(cfg, layer, f"override {item!r} ({layer_path})")
            continue
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    where = sources[-1] if sources else "config"
    return _typed(cfg, f"{where} with overrides {list(overrides)}" if overrides else where)


def with_stage(exp: ExperimentConfig, name: str) -> ExperimentConfig:
    """``exp`` with the stage ``name``'s YAML merged on top (as the override ``stage=NAME`` would)."""
    merged = OmegaConf.structured(exp)
    for layer_path, layer in _read_with_includes(stage_path(name)):
        merged = _merge(merged, layer, f"stage {name!r} ({layer_path})")
    return _typed(merged, f"stage {name!r}")


def with_overrides(exp: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``exp`` with dot-list overrides applied and checked again (a copy; ``exp`` is unchanged)."""
    merged = OmegaConf.structured(exp)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    return _typed(merged, f"overrides {list(overrides)}")


def to_yaml(exp: ExperimentConfig) -> str:
    """The config as YAML (what a run records as its artifact)."""
    return OmegaConf.to_yaml(OmegaConf.structured(exp), resolve=True)


def from_yaml(text: str, source: str = "config.yaml") -> ExperimentConfig:
    """A config written by ``to_yaml`` (a run's ``config.yaml``), typed and checked again."""
    try:
        layer = OmegaConf.create(text)
    except Exception as e:
        raise ConfigError(f"{source}: cannot parse YAML: {e}") from e
    return _typed(_merge(OmegaConf.structured(ExperimentConfig), layer, source), source)


def to_dict(exp: Any) -> dict[str, Any]:
    """A config (or any section of one) as plain dicts and lists: what MLflow params and JSON take."""
    return OmegaConf.to_container(OmegaConf.structured(exp), resolve=True)  # type: ignore[return-value]
