"""``fvl shards build|merge`` and ``fvl features build``: the data a run reads, built ahead of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fvl.cli.args import POSITIONAL as _POS


@dataclass
class ShardsBuildArgs:
    """Build (or resume) the WebDataset shards of a data recipe.

    recipe: recipe YAML or a name in data_recipes/ (e.g. synthetic).
    out: output folder.
    part: K/N: build the K-th of N disjoint parts (then fvl shards merge).
    workers: worker processes.
    samples_per_shard: override the recipe's shards.samples_per_shard (0: keep it).
    max_images: skip samples with more images than this, as too_many_images (0: the recipe's shards.max_images).
    quiet: no progress bar.
    """

    recipe: str = field(metadata=_POS)
    out: str
    part: str | None = None
    workers: int = 2
    samples_per_shard: int = 0
    max_images: int = 0
    quiet: bool = False


def shards_build(args: ShardsBuildArgs) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fvl.data.recipes import load_recipe
    from fvl.data.shards import build, parse_part

    recipe = load_recipe(args.recipe)
    if args.samples_per_shard:
        recipe.shards.samples_per_shard = args.samples_per_shard
    if args.max_images:
        recipe.shards.max_images = args.max_images
    parse_part(args.part)  # a bad --part fails before any work
    # No total: the annotation files are streamed once, by the build itself, so their length is not known
    # up front (counting them first would read multi-GB files twice).
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]shards"),
        TextColumn("{task.completed:.0f} items"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=args.quiet) as bar:
        task = bar.add_task("build", total=None)
        manifest = build(
            recipe, args.out, part=args.part, workers=args.workers, progress=lambda m: bar.advance(task, m)
        )
    for name, s in manifest["sources"].items():
        skipped = ", ".join(f"{r} {c}" for r, c in sorted(s["skipped"].items())) or "none"
        print(f"{name}: {s['written']} written, skipped: {skipped}")
    print(f"{len(manifest['shards'])} shards in {args.out} (part {manifest['part']})")
    return 0


@dataclass
class ShardsMergeArgs:
    """Combine the part manifests of a build split with --part into manifest.json.

    out: the folder the parts were built into.
    """

    out: str = field(metadata=_POS)


def shards_merge(args: ShardsMergeArgs) -> int:
    from fvl.data.shards import merge

    manifest = merge(args.out)
    print(f"merged {len(manifest['shards'])} shards into {args.out}/manifest.json")
    return 0


@dataclass
class FeaturesBuildArgs:
    """Run a checkpoint's frozen tower once over the shards' images and write the fused features (a feature
    cache that data.feature_cache=DIR reads instead of running the tower).

    checkpoint: weights file, run folder or latest (the newest run under --runs).
    shards: folder of built shards (their manifest.json).
    out: output folder of the cache.
    sources: sources whose shards to cover (default: all in the manifest).
    resize_mode: the image transform of the stage that reads the cache: pad (finetune) or square (align).
    dtype: storage dtype of the features: bfloat16, float16 or float32.
    batch_size: images per tower forward.
    workers: DataLoader worker processes decoding images.
    device: auto (a GPU when there is one), cuda or cpu.
    runs: where latest looks for runs.
    all_features: store every feature of the tower side by side instead of the checkpoint's fused ones: the
      cache then serves any parameter-free fusion over a subset of them (one cache for a fusion sweep).
    quiet: no progress bar.
    """

    checkpoint: str = field(metadata=_POS)
    shards: str = "shards/synthetic"
    out: str = ""
    sources: list[str] = field(default_factory=list)
    resize_mode: str = "pad"
    dtype: str = "bfloat16"
    batch_size: int = 32
    workers: int = 1
    device: str = "auto"
    runs: str = "runs"
    all_features: bool = False
    quiet: bool = False


def features_build(args: FeaturesBuildArgs) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fvl.data.feature_cache.build import build_features
    from fvl.data.shards import load_manifest
    from fvl.data.shardset import shard_set

    if not args.out:
        raise FileNotFoundError("--out DIR: where to write the feature cache")
    total = shard_set(args.shards, load_manifest(args.shards), args.sources or None).total
    columns = (TextColumn("[bold]features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=args.quiet, transient=True) as bar:
        task = bar.add_task("features", total=total)
        manifest = build_features(
            args.checkpoint, args.shards, args.out, args.sources, args.resize_mode, args.dtype,
            args.batch_size, args.workers, args.device, args.runs, progress=lambda n: bar.advance(task, n),
            all_features=args.all_features,
        )  # fmt: skip
    ident = manifest["identity"]
    print(
        f"feature cache {args.out}: {len(manifest['shards'])} shards, {ident['tokens']} x {ident['dim']} "
        f"{ident['dtype']} per image, skipped {manifest['skipped'] or 'none'}, {manifest['seconds']:.0f} s; "
        f"train with data.feature_cache={args.out}"
    )
    return 0
