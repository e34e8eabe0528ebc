"""The ``fvl`` command line. Each subcommand is a thin layer over the library's public functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from fvl.config import load, to_yaml
    from fvl.models import build_model, set_trainable

    cfg = load(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
    model = build_model(cfg.model)
    counts = set_trainable(model, args.stage)
    print(
        f"preset {cfg.model.preset}: {model.vision.num_tokens} tokens/feature, fusion {cfg.model.fusion.name} "
        f"{list(cfg.model.fusion.features)} -> {model.num_image_tokens} LLM tokens/image of width {model.hidden_size}"
    )
    for component, c in counts.items():
        print(
            f"  {component:<10} trainable {c['trainable']:>14,}  frozen {c['frozen']:>14,}  unused {c['unused']:>12,}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fvl.models import export, load_checkpoint

    model = load_checkpoint(args.checkpoint)
    out = export(model, args.out)
    print(
        f"exported to {out}: llm/ and vision/ load with transformers from_pretrained; fvl.models.load_exported loads all"
    )
    return 0


def _cmd_not_yet(args: argparse.Namespace) -> int:
    print(
        f"fvl {args.command}: not available in this version yet - it lands with the training / data / evaluation "
        "issues (see the README's roadmap). Available now: fvl info, fvl export.",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvl", description="Florence-VL experiment kit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser(
        "info", help="build a model from a config and print its token counts and trainable set"
    )
    info.add_argument(
        "config", help="experiment YAML or model preset name (tiny, florence_vl_3b, florence_vl_8b)"
    )
    info.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. model.fusion.name=avg_pool")
    info.add_argument("--stage", default="pretrain", help="stage whose trainable set to report")
    info.add_argument("--print-config", action="store_true", help="print the resolved config first")
    info.set_defaults(func=_cmd_info)

    exp = sub.add_parser("export", help="write a transformers-loadable folder from an fvl checkpoint")
    exp.add_argument("checkpoint", help="an fvl safetensors checkpoint")
    exp.add_argument("out", help="output folder")
    exp.set_defaults(func=_cmd_export)

    for name in ("train", "sweep", "eval", "shards", "chat", "align", "pca"):
        p = sub.add_parser(name, help="(coming)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_not_yet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
