"""The ``fvl`` command line. Each subcommand is a thin layer over the library's public functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


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


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from fvl.eval.benchmarks import resolve_benchmark
    from fvl.eval.evaluate import evaluate, log_to_mlflow, print_results
    from fvl.train.checkpointing import load_for_inference, resolve_checkpoint
    from fvl.train.tracking import tracking_uri

    ckpt = resolve_checkpoint(args.checkpoint, args.runs)
    model = load_for_inference(ckpt)
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    results, paths = [], []
    for spec in args.bench or ["synthetic"]:
        bench = resolve_benchmark(spec, args.samples)
        result = evaluate(model, bench, args.batch_size, args.max_new_tokens, progress=not args.quiet)
        path = out / f"{bench.name}.json"
        path.write_text(json.dumps(result.to_json(), indent=1))
        results.append(result)
        paths.append(path)
        print_results(result)
    run_id = log_to_mlflow(results, ckpt, tracking_uri(), paths)
    print(f"results: {', '.join(str(p) for p in paths)}; MLflow run {run_id}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from PIL import Image

    from fvl.train.checkpointing import load_for_inference, resolve_checkpoint

    model = load_for_inference(resolve_checkpoint(args.checkpoint, args.runs))
    image = Image.open(args.image).convert("RGB") if args.image else None

    def answer(question: str) -> str:
        return model.generate([image], [question], max_new_tokens=args.max_new_tokens)[0]

    if args.question:
        print(answer(" ".join(args.question)))
        return 0
    print("fvl chat: type a question; ':image PATH' changes the image; ':quit' or Ctrl-D ends.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in (":quit", ":q"):
            return 0
        if line.startswith(":image "):
            image = Image.open(line.split(" ", 1)[1].strip()).convert("RGB")
            continue
        if line:
            print(answer(line))


def _analysis_model(spec: str, runs: str):
    """A checkpoint (file, run folder, 'latest') or a model preset built with its own init."""
    from fvl.config import EXPERIMENTS_DIR, load
    from fvl.models import build_model
    from fvl.train.checkpointing import load_for_inference, resolve_checkpoint

    if (EXPERIMENTS_DIR / "models" / f"{spec}.yaml").exists():
        return build_model(load(spec).model).eval()
    return load_for_inference(resolve_checkpoint(spec, runs))


def _log_analysis(kind: str, files: list[Path], tags: dict[str, str]) -> str:
    from mlflow.tracking import MlflowClient

    from fvl.train.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("fvl") or client.get_experiment(client.create_experiment("fvl"))
    run_id = client.create_run(
        exp.experiment_id, tags={"analysis": kind, "mlflow.runName": kind, **tags}
    ).info.run_id
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path=kind)
    client.set_terminated(run_id)
    return run_id


def _cmd_align(args: argparse.Namespace) -> int:
    from fvl.eval.align import alignment_curves, parse_variant, write_curves

    model = _analysis_model(args.model, args.runs)
    specs = args.variant or [str(p) for p in DEFAULT_ALIGN_VARIANTS]
    variants = [parse_variant(v) for v in specs]
    curves = alignment_curves(
        model, variants, args.steps, args.batch_size, args.samples, args.lr, args.temperature, args.seed
    )
    csv_path, png_path = write_curves(curves, args.out)
    for label, losses in curves.items():
        print(f"{label:>16}: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    run_id = _log_analysis("align", [csv_path, png_path], {"model": args.model})
    print(f"wrote {png_path} and {csv_path}; MLflow run {run_id}")
    return 0


def _cmd_pca(args: argparse.Namespace) -> int:
    from PIL import Image

    from fvl.data.synthetic import generate
    from fvl.eval.pca import pca_panels, write_pca

    model = _analysis_model(args.model, args.runs)
    image = (
        Image.open(args.image).convert("RGB")
        if args.image
        else generate(args.index, "test", image_size=model.vision.image_size).image
    )
    panels = pca_panels(model, image, args.feature, args.threshold)
    png, csv_path = write_pca(image, panels, args.out)
    run_id = _log_analysis("pca", [png, csv_path], {"model": args.model})
    print(f"wrote {png} ({len(panels)} panels) and {csv_path}; MLflow run {run_id}")
    return 0


DEFAULT_ALIGN_VARIANTS = [
    Path(__file__).resolve().parent.parent / "experiments" / "fusion" / f"{n}.yaml"
    for n in ("dbfusion", "minus_davit", "minus_caption", "minus_ocr", "minus_grounding", "davit_only")
]


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

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint on benchmarks (default: the synthetic test split)"
    )
    ev.add_argument("checkpoint", nargs="?", default="latest", help="weights file, run folder or 'latest'")
    ev.add_argument("--bench", action="append", help="'synthetic' or NAME=PATH (parquet); repeatable")
    ev.add_argument("--samples", type=int, default=700, help="synthetic test questions (100 per skill kind)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--out", default=None, help="folder for the JSON results (default: the run's eval/)")
    ev.add_argument("--runs", default="runs", help="where 'latest' looks for runs")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    ch = sub.add_parser("chat", help="ask a checkpoint about an image")
    ch.add_argument("checkpoint", help="weights file, run folder or 'latest'")
    ch.add_argument("question", nargs="*", help="the question (none: an interactive loop)")
    ch.add_argument("--image", default=None, help="image file")
    ch.add_argument("--max-new-tokens", type=int, default=64)
    ch.add_argument("--runs", default="runs")
    ch.set_defaults(func=_cmd_chat)

    al = sub.add_parser(
        "align", help="the paper's vision-language alignment loss for several fusion variants"
    )
    al.add_argument("--model", default="tiny", help="checkpoint (file, run folder, 'latest') or model preset")
    al.add_argument("--variant", action="append", help="fusion YAML or LABEL=FUSION:feat+feat; repeatable")
    al.add_argument("--steps", type=int, default=200)
    al.add_argument("--batch-size", type=int, default=64)
    al.add_argument("--samples", type=int, default=1024, help="synthetic caption pairs")
    al.add_argument("--lr", type=float, default=1e-3)
    al.add_argument("--temperature", type=float, default=0.07)
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--out", default="outputs/align")
    al.add_argument("--runs", default="runs")
    al.set_defaults(func=_cmd_align)

    pc = sub.add_parser("pca", help="PCA of each named vision feature of an image (the paper's Fig. 3)")
    pc.add_argument("--model", default="tiny", help="checkpoint (file, run folder, 'latest') or model preset")
    pc.add_argument("--image", default=None, help="image file (default: a synthetic test image)")
    pc.add_argument("--index", type=int, default=0, help="synthetic test image index when no --image")
    pc.add_argument("--feature", action="append", help="feature names (default: all)")
    pc.add_argument(
        "--threshold", type=float, default=0.5, help="first-component threshold for the background"
    )
    pc.add_argument("--out", default="outputs/pca")
    pc.add_argument("--runs", default="runs")
    pc.set_defaults(func=_cmd_pca)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if (
        extra and args.command == "chat"
    ):  # `fvl chat CKPT --image PATH "question"`: the question may follow options
        args.question = [*args.question, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    fvl_log = logging.getLogger("fvl")
    fvl_log.addHandler(handler)
    fvl_log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    fvl_log.propagate = False
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
