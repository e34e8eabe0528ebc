"""``fvl train`` and ``fvl florence2-tiny`` (stage 0): runs that write checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fvl.assets.florence2_tiny.config import Florence2TinyConfig
from fvl.cli.args import POSITIONAL as _POS


@dataclass
class TrainArgs:
    """Train a stage from an experiment YAML.

    config: experiment YAML or name, e.g. experiments/pretrain.yaml or pretrain.
    overrides: dot-list overrides: trainer.max_steps=400 resume=last stage=finetune ...
    """

    config: str = field(metadata=_POS)
    overrides: list[str] = field(default_factory=list, metadata=_POS)


def train(args: TrainArgs) -> int:
    from fvl.config import load
    from fvl.runs.folder import is_rank_zero
    from fvl.runs.tracking import tracking_uri
    from fvl.train.run import print_summary
    from fvl.train.run import train as run_training

    cfg = load(args.config, args.overrides)
    result = run_training(cfg)
    if is_rank_zero():
        print_summary(result, tracking_uri(cfg.tracking))
    return 0


@dataclass
class Florence2TinyArgs:
    """Train the tiny preset's Florence-2 on its own tasks (detailed caption, OCR, dense region captions with
    location tokens) and save it as a transformers-native folder; prints its task metrics.

    out: folder to write (default: the cache folder that model.vision.path=builtin:florence2-tiny reads,
      when the settings are the defaults).
    force: rebuild even if the folder holds a build.
    quiet: no progress bar.
    """

    florence2: Florence2TinyConfig = field(default_factory=Florence2TinyConfig)
    out: str | None = None
    force: bool = False
    quiet: bool = False


def florence2_tiny(args: Florence2TinyArgs) -> int:
    import json

    from fvl.assets.builtin import builtin_folder
    from fvl.assets.florence2_tiny.build import build

    if args.out is None and args.florence2 != Florence2TinyConfig():
        raise ValueError(
            "florence2-tiny: other settings than the defaults need --out (the built-in is the default)"
        )
    out = Path(args.out) if args.out else builtin_folder("florence2-tiny")
    if (out / "fvl_build.json").exists() and not args.force:
        print(f"{out} holds a build already (--force rebuilds):")
        print(json.dumps(json.loads((out / "fvl_build.json").read_text())["metrics"], indent=1))
        return 0
    metrics = build(args.florence2, out, progress=not args.quiet)
    print(json.dumps(metrics, indent=1))
    print(
        f"wrote {out}: use it with model.vision.init=pretrained model.vision.path={args.out or 'builtin:florence2-tiny'}"
    )
    return 0
