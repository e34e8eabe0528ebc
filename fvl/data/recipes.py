"""Data recipes: YAML files listing the sources of a data mixture, validated on load.

```yaml
sources:
  - name: llava_instruct          # unique; shard names and manifest entries use it
    format: llava_json            # llava_json | caption_jsonl | synthetic
    annotations: llava_v1_5_mix665k.json   # relative paths resolve against the recipe's folder
    image_root: images/
    weight: 1.0                   # mixing weight, read at training time (changing it rebuilds no shard)
    max_samples: null             # keep only the first N items
shards:
  samples_per_shard: 1000
  max_shard_bytes: 1.0e9
  max_images: 0                   # > 0: samples with more images are skipped (too_many_images)
```
A ``synthetic`` source takes ``split``, ``num_samples``, ``image_size``, ``seed``, ``task`` (``caption`` |
``qa``) and ``kinds`` instead of files. Unknown keys, missing files and bad weights are errors that name the
recipe and the key. ``llava_json`` also reads JSON lines when the file name ends in ``.jsonl``. Every field
but ``weight``, and the ``shards`` settings, are part of the shards' fingerprint: changing one rebuilds that
source's shards on the next ``fvl shards build`` into the same folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fvl.config import ConfigError, read_yaml, typed
from fvl.synthetic import KINDS, SPLITS, TASKS
from fvl.util import resources

FORMATS = ("llava_json", "caption_jsonl", "synthetic")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe file and the key."""


@dataclass
class SourceConfig:
    """One source of a recipe (see the module docstring)."""

    name: str = "???"
    format: str = "???"
    annotations: str | None = None
    image_root: str | None = None
    weight: float = 1.0
    max_samples: int | None = None
    # llava_json: ``llava`` applies LLaVA's preprocessing (what the authors trained with): a lone ``<image>``
    # moves to the front of its turn, a leading non-human turn is dropped; ``as_written`` keeps turns as they are
    # (such samples are then skipped as ``bad_roles``). The manifest counts what was normalised.
    conversation_rules: str = "llava"
    # synthetic only
    split: str = "train"
    num_samples: int = 0
    image_size: int = 64
    seed: int = 0
    task: str = "qa"
    kinds: list[str] | None = None


CONVERSATION_RULES = ("llava", "as_written")


@dataclass
class ShardSettings:
    """How shards are cut: at most ``samples_per_shard`` input items per shard task (skipped items count),
    and a new tar file whenever one passes ``max_shard_bytes``. ``max_images`` (0: no limit): a sample with
    more images can never fit the model's ``max_length`` and is skipped as ``too_many_images`` (training
    sets it from the model: (max_length - min_text_tokens) // tokens per image)."""

    samples_per_shard: int = 1000
    max_shard_bytes: float = 1.0e9
    max_images: int = 0


@dataclass
class Recipe:
    sources: list[SourceConfig] = field(default_factory=list)
    shards: ShardSettings = field(default_factory=ShardSettings)
    description: str = ""
    path: str = ""  # filled in on load: the file it came from

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"recipe {self.path}: no source {name!r}; it has {[s.name for s in self.sources]}")


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe file, or a name in ``data_recipes/`` (``synthetic``): the working directory's folder first,
    then the recipes that ship with fvl."""
    p = Path(path)
    if p.exists():
        return p
    named = resources.find("data_recipes", f"{p.name}.yaml" if p.suffix == "" else p.name)
    if named is not None:
        return named
    known = ", ".join(resources.names("data_recipes"))
    raise RecipeError(f"recipe {path!r} not found (shipped and local recipes: {known})")


def load_recipe(path: str | Path, check_files: bool = True) -> Recipe:
    """Load and validate a recipe. ``check_files=False`` skips the existence checks (to read the shipped
    templates whose paths a user fills in)."""
    path = resolve_recipe_path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise RecipeError(f"recipe {e}") from None
    # Each source on its own, so that an error names it: sources[i].key.
    sources = raw.pop("sources", None) if isinstance(raw, dict) else None
    if sources is not None and not isinstance(sources, list):
        raise RecipeError(f"recipe {path}: 'sources' must be a list")
    try:
        parsed = [
            typed(SourceConfig, item, source=f"recipe {path}", prefix=f"sources[{i}].")
            for i, item in enumerate(sources or [])
        ]
        recipe = typed(Recipe, raw, source=f"recipe {path}")
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    recipe.sources = parsed
    recipe.path = os.path.normpath(os.path.abspath(path))
    _validate(recipe, path.parent, check_files)
    return recipe


def _absolute(folder: Path, path: str) -> str:
    return os.path.normpath(os.path.abspath(folder / Path(path).expanduser()))


def _validate(recipe: Recipe, folder: Path, check_files: bool) -> None:
    where = f"recipe {recipe.path}"
    if not recipe.sources:
        raise RecipeError(f"{where}: 'sources' is empty")
    names = [s.name for s in recipe.sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: duplicate source names {names}")
    if recipe.shards.max_images < 0:
        raise RecipeError(f"{where}: shards.max_images must be >= 0 (0: no limit)")
    if recipe.shards.samples_per_shard <= 0 or recipe.shards.max_shard_bytes <= 0:
        raise RecipeError(f"{where}: shards.samples_per_shard and shards.max_shard_bytes must be positive")
    for i, s in enumerate(recipe.sources):
        key = f"{where}: sources[{i}] ({s.name})"
        if s.name in ("", "???") or not s.name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{key}.name: use letters, digits, '_' or '-' (it names shard files)")
        if s.format not in FORMATS:
            raise RecipeError(f"{key}.format={s.format!r}: expected one of {', '.join(FORMATS)}")
        if not (s.weight > 0) or s.weight != s.weight or s.weight == float("inf"):
            raise RecipeError(f"{key}.weight={s.weight}: must be a positive finite number")
        if s.max_samples is not None and s.max_samples < 0:
            raise RecipeError(f"{key}.max_samples must be >= 0")
        if s.conversation_rules not in CONVERSATION_RULES:
            raise RecipeError(
                f"{key}.conversation_rules={s.conversation_rules!r}: expected one of {', '.join(CONVERSATION_RULES)}"
            )
        if s.format == "synthetic":
            if s.split not in SPLITS:
                raise RecipeError(f"{key}.split={s.split!r}: expected one of {SPLITS}")
            if s.task not in TASKS:
                raise RecipeError(f"{key}.task={s.task!r}: expected one of {TASKS}")
            if s.num_samples <= 0:
                raise RecipeError(f"{key}.num_samples must be positive for a synthetic source")
            unknown = [k for k in s.kinds or [] if k not in KINDS]
            if unknown:
                raise RecipeError(f"{key}.kinds: unknown {unknown}; known: {list(KINDS)}")
            continue
        if not s.annotations:
            raise RecipeError(f"{key}.annotations is required for format {s.format}")
        # Absolute and normalised (links not followed), so one recipe spelled two ways (relative to its folder,
        # absolute, through "..") fingerprints alike and its shards are the same shards.
        s.annotations = _absolute(folder, s.annotations)
        if s.image_root:
            s.image_root = _absolute(folder, s.image_root)
        if check_files:
            if not Path(s.annotations).is_file():
                raise RecipeError(f"{key}.annotations: file not found: {s.annotations}")
            if s.image_root and not Path(s.image_root).is_dir():
                raise RecipeError(f"{key}.image_root: folder not found: {s.image_root}")
