"""``fvl info``: what a config builds (its trainable set, token counts, parameters), without training."""

from __future__ import annotations

from dataclasses import dataclass, field

from fvl.cli.args import POSITIONAL as _POS


@dataclass
class InfoArgs:
    """Build a model from a config and print its token counts and trainable set.

    config: experiment YAML, experiment name (pretrain) or model preset (tiny, florence_vl_3b, florence_vl_8b).
    overrides: dot-list overrides, e.g. model.fusion.name=avg_pool.
    stage: the stage whose trainable set to report (a name in experiments/stages; default: the config's).
    print_config: print the resolved config first.
    """

    config: str = field(metadata=_POS)
    overrides: list[str] = field(default_factory=list, metadata=_POS)
    stage: str = ""
    print_config: bool = False


def info(args: InfoArgs) -> int:
    from fvl.config import load, to_yaml
    from fvl.models import build_model, set_trainable

    cfg = load(args.config, [*args.overrides, *([f"stage={args.stage}"] if args.stage else [])])
    if args.print_config:
        print(to_yaml(cfg))
    model = build_model(cfg.model)
    counts = set_trainable(model, cfg.stage.trainable, label=cfg.stage.name)
    print(
        f"preset {cfg.model.preset}: {model.vision.num_tokens} tokens/feature, fusion {cfg.model.fusion.name} "
        f"{list(cfg.model.fusion.features)} -> {model.num_image_tokens} LLM tokens/image of width "
        f"{model.hidden_size}; stage {cfg.stage.name}"
    )
    for component, c in counts.items():
        print(
            f"  {component:<16} trainable {c['trainable']:>14,}  frozen {c['frozen']:>14,}  unused {c['unused']:>12,}"
        )
    return 0
