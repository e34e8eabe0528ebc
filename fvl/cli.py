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


def _cmd_shards_build(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fvl.data.recipes import load_recipe
    from fvl.data.shards import build, parse_part, plan, read_items

    recipe = load_recipe(args.recipe)
    if args.samples_per_shard:
        recipe.shards.samples_per_shard = args.samples_per_shard
    k, n = parse_part(args.part)
    counts = {s.name: len(read_items(s)) for s in recipe.sources}
    total = sum(t.end - t.start for i, t in enumerate(plan(recipe, counts)) if i % n == k)
    columns = (
        TextColumn("[bold]shards"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("items"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=args.quiet) as bar:
        task = bar.add_task("build", total=total)
        manifest = build(
            recipe, args.out, part=args.part, workers=args.workers, progress=lambda m: bar.advance(task, m)
        )
    for name, s in manifest["sources"].items():
        skipped = ", ".join(f"{r} {c}" for r, c in sorted(s["skipped"].items())) or "none"
        print(f"{name}: {s['written']} written, skipped: {skipped}")
    print(f"{len(manifest['shards'])} shards in {args.out} (part {manifest['part']})")
    return 0


def _cmd_shards_merge(args: argparse.Namespace) -> int:
    from fvl.data.shards import merge

    manifest = merge(args.out)
    print(f"merged {len(manifest['shards'])} shards into {args.out}/manifest.json")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fvl.config import load
    from fvl.train.run import print_summary, train
    from fvl.train.tracking import tracking_uri

    cfg = load(args.config, args.overrides)
    result = train(cfg)
    if result.info.get("finished"):
        print_summary(result, tracking_uri(cfg))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fvl.train.sweep import load_sweep, print_sweep_summary, run_sweep

    runs = run_sweep(args.sweep, args.overrides)
    print_sweep_summary(load_sweep(args.sweep).name, runs)
    return 0 if all(r.status == "ok" for r in runs) else 1


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

    shards = sub.add_parser("shards", help="build WebDataset shards from a data recipe").add_subparsers(
        dest="action", required=True
    )
    b = shards.add_parser("build", help="build (or resume) the shards of a recipe")
    b.add_argument("recipe", help="recipe YAML or a name in data_recipes/ (e.g. synthetic)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument(
        "--part", default=None, help="K/N: build the K-th of N disjoint parts (then `fvl shards merge`)"
    )
    b.add_argument("--workers", type=int, default=2, help="worker processes")
    b.add_argument(
        "--samples-per-shard", type=int, default=0, help="override the recipe's shards.samples_per_shard"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_shards_build)
    m = shards.add_parser("merge", help="combine part manifests into manifest.json")
    m.add_argument("out", help="the folder the parts were built into")
    m.set_defaults(func=_cmd_shards_merge)

    tr = sub.add_parser("train", help="train a stage from an experiment YAML")
    tr.add_argument("config", help="experiment YAML, e.g. experiments/pretrain.yaml")
    tr.add_argument("overrides", nargs="*", help="dot-list overrides: trainer.max_steps=400 resume=last ...")
    tr.set_defaults(func=_cmd_train)

    sw = sub.add_parser("sweep", help="run a grid of experiments declared in a sweep YAML")
    sw.add_argument("sweep", help="sweep YAML, e.g. experiments/sweeps/fusion.yaml")
    sw.add_argument("overrides", nargs="*", help="dot-list overrides applied to every run")
    sw.set_defaults(func=_cmd_sweep)

    for name in ("eval", "chat", "align", "pca"):
        p = sub.add_parser(name, help="(coming)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_not_yet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    fvl_log = logging.getLogger("fvl")
    fvl_log.addHandler(handler)
    fvl_log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    fvl_log.propagate = False
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
