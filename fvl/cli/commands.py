"""The ``fvl`` subcommands as typed functions. Each takes one argument dataclass whose fields and docstring
generate the command's parser (``fvl.cli.args``); each function is a thin call into the library."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fvl.eval.config import AlignConfig, EvalConfig, PCAConfig
from fvl.florence2_tiny.config import Florence2TinyConfig
from fvl.tracking import DEFAULT_EXPERIMENT

_POS = {"positional": True}
ALIGN_VARIANTS = ("dbfusion", "minus_davit", "minus_caption", "minus_ocr", "minus_grounding", "davit_only")


# ---- models ------------------------------------------------------------------------------------------------
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
            f"  {component:<10} trainable {c['trainable']:>14,}  frozen {c['frozen']:>14,}  unused {c['unused']:>12,}"
        )
    return 0


@dataclass
class ExportArgs:
    """Write a transformers-loadable folder from an fvl checkpoint.

    checkpoint: an fvl safetensors checkpoint, a run folder or latest.
    out: output folder.
    runs: where latest looks for runs.
    """

    checkpoint: str = field(metadata=_POS)
    out: str = field(metadata=_POS)
    runs: str = "runs"


def export(args: ExportArgs) -> int:
    from fvl.models import export as export_model
    from fvl.models import load_for_inference

    out = export_model(load_for_inference(args.checkpoint, args.runs), args.out)
    print(
        f"exported to {out}: llm/ and vision/ load with transformers from_pretrained (vision/ with its "
        "AutoProcessor); fvl.models.load_exported loads all"
    )
    return 0


# ---- data --------------------------------------------------------------------------------------------------
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


# ---- training ----------------------------------------------------------------------------------------------
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

    from fvl.data.shards import load_manifest
    from fvl.data.shardset import shard_set
    from fvl.features import build_features

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
    from fvl.runs import is_rank_zero
    from fvl.tracking import tracking_uri
    from fvl.train.run import print_summary
    from fvl.train.run import train as run_training

    cfg = load(args.config, args.overrides)
    result = run_training(cfg)
    if is_rank_zero():
        print_summary(result, tracking_uri(cfg.tracking))
    return 0


@dataclass
class SweepArgs:
    """Run a grid of experiments declared in a sweep YAML, reporting failures and going on.

    sweep: sweep YAML, e.g. experiments/sweeps/fusion.yaml.
    overrides: dot-list overrides applied to every run.
    parallel: grid points trained side by side, each in a worker process (0: the sweep YAML's parallel).
    no_notebook: skip the sweep's notebook (its ``notebook:``) at the end.
    """

    sweep: str = field(metadata=_POS)
    overrides: list[str] = field(default_factory=list, metadata=_POS)
    parallel: int = 0
    no_notebook: bool = False


def sweep(args: SweepArgs) -> int:
    from fvl.train.sweep import load_sweep, print_sweep_summary, report, run_sweep

    spec = load_sweep(args.sweep)
    runs = run_sweep(args.sweep, args.overrides, parallel=args.parallel or None)
    print_sweep_summary(spec.name, runs)
    ok = all(r.status == "ok" for r in runs)
    if spec.notebook is not None and not args.no_notebook and runs:
        try:
            print(f"report: {report(spec, runs[0].sweep_id, args.overrides)}")
        except Exception as e:  # noqa: BLE001 - the runs are done and kept; say what failed
            print(
                f"report: {spec.notebook.name} failed on launch {runs[0].sweep_id}: {type(e).__name__}: {e}"
            )
            ok = False
    return 0 if ok else 1


# ---- evaluation and analysis -------------------------------------------------------------------------------
@dataclass
class EvalArgs:
    """Evaluate a checkpoint on benchmarks (default: the synthetic test split, per skill).

    checkpoint: weights file, run folder or latest (the newest run under --runs).
    out: folder for the JSON results (default: the run's eval/).
    runs: where latest looks for runs.
    experiment: MLflow experiment of a new run when the checkpoint has none (default: its run's config's).
    quiet: no progress bar.
    """

    checkpoint: str = field(default="latest", metadata=_POS)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = None
    runs: str = "runs"
    experiment: str | None = None
    quiet: bool = False


def evaluate(args: EvalArgs) -> int:
    from fvl.eval.evaluate import evaluate_checkpoint, print_results
    from fvl.tracking import TrackingConfig

    tracking = TrackingConfig(experiment=args.experiment) if args.experiment else None
    report = evaluate_checkpoint(
        args.checkpoint, args.eval, args.runs, args.out, tracking, progress=not args.quiet
    )
    for result in report.results:
        print_results(result)
    print(f"results: {', '.join(str(p) for p in report.paths)}; MLflow run {report.mlflow_run_id}")
    return 0


@dataclass
class ChatArgs:
    """Ask a checkpoint about an image; without a question, an interactive loop.

    checkpoint: weights file, run folder or latest.
    question: the question (none: an interactive loop).
    image: image file.
    max_new_tokens: longest answer.
    runs: where latest looks for runs.
    """

    checkpoint: str = field(metadata=_POS)
    question: list[str] = field(default_factory=list, metadata=_POS)
    image: str | None = None
    max_new_tokens: int = 64
    runs: str = "runs"


def chat(args: ChatArgs) -> int:
    from PIL import Image

    from fvl.models import load_for_inference

    model = load_for_inference(args.checkpoint, args.runs)
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


@dataclass
class AnalysisTarget:
    """What an analysis runs on, and where it is logged.

    model: checkpoint (file, run folder, latest) or model preset (built with its own init).
    runs: where latest looks for runs.
    experiment: MLflow experiment of the analysis run.
    """

    model: str = "tiny"
    runs: str = "runs"
    experiment: str = DEFAULT_EXPERIMENT

    def load_model(self):
        from fvl import resources
        from fvl.models import build_model, load_for_inference

        if not Path(self.model).exists() and self.model in resources.names("experiments", "models"):
            from fvl.config import load

            return build_model(load(self.model).model).eval()
        return load_for_inference(self.model, self.runs)

    def log(self, kind: str, files: list[Path]) -> str:
        from fvl.tracking import TrackingConfig, analysis_run

        return analysis_run(kind, files, {"model": self.model}, TrackingConfig(experiment=self.experiment))


@dataclass
class AlignArgs:
    """The paper's vision-language alignment for several fusion variants: held-out contrastive loss and
    retrieval accuracy, mean and std over seeds, and the training-loss curves.

    out: output folder (align.csv: training curves; align_summary.csv: held-out scores per variant and seed;
      align_table.csv: their mean and std; align.png).
    """

    target: AnalysisTarget = field(default_factory=AnalysisTarget)
    align: AlignConfig = field(default_factory=AlignConfig)
    out: str = "outputs/align"


def align(args: AlignArgs) -> int:
    from fvl import resources
    from fvl.eval.align import alignment_analysis, format_table, parse_variant, write_results

    specs = args.align.variant or [
        str(resources.find("experiments", f"fusion/{n}.yaml")) for n in ALIGN_VARIANTS
    ]
    variants = [parse_variant(v) for v in specs]  # before the model loads, so that a typo fails fast
    model = args.target.load_model()
    result = alignment_analysis(model, variants, args.align)
    files = write_results(result, args.out)
    print(format_table(result))
    run_id = args.target.log("align", files.all())
    print(f"wrote {', '.join(str(p) for p in files.all())}; MLflow run {run_id}")
    return 0


@dataclass
class PCAArgs:
    """PCA of each named vision feature of an image, first three components as RGB (the paper's Fig. 3).

    out: output folder (pca.png, pca.csv).
    """

    target: AnalysisTarget = field(default_factory=AnalysisTarget)
    pca: PCAConfig = field(default_factory=PCAConfig)
    out: str = "outputs/pca"


def pca(args: PCAArgs) -> int:
    from PIL import Image

    from fvl.data.synthetic import generate
    from fvl.eval.pca import pca_panels, write_pca

    model = args.target.load_model()
    c = args.pca
    size = model.vision.image_size
    image = (
        Image.open(c.image).convert("RGB") if c.image else generate(c.index, "test", image_size=size).image
    )
    panels = pca_panels(model, image, c.feature or None, c.threshold)
    png, csv_path = write_pca(image, panels, args.out)
    print(
        f"wrote {png} ({len(panels)} panels) and {csv_path}; MLflow run {args.target.log('pca', [png, csv_path])}"
    )
    return 0


# ---- stage 0: the tiny Florence-2 ---------------------------------------------------------------------------
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

    from fvl.florence2_tiny.build import build
    from fvl.models.vision.builtin import builtin_folder

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


# ---- benchmarks and notebooks ------------------------------------------------------------------------------
@dataclass
class BenchArgs:
    """Benchmarks with the machine and date (figures, never asserted in tests).

    which: images (decode + preprocess per image at 768 px), loader (the shard reader in-process and with
      workers, PNGs and JPEG photos), packing (padded vs packed training steps at LLaVA-like lengths),
      cache (make finetune's configuration with and without a feature cache, samples/s), features (Florence-2 feature extraction, fvl's way vs a full forward per prompt, at base size; the
      large size on a GPU), pretrain (the median of three runs of make pretrain's command, shard build
      included) and / or step (a training step of the shipped 3B finetune configuration at real size, with
      MFU; a GPU check). Each writes its figures into benchmarks/latest.json.
    samples: images per kind for the loader benchmark (at most 24 for images).
    tiny: run step on the tiny preset (a CPU smoke test of the GPU check).
    json: write the step figures to this JSON file too.
    fsdp: run step under fvl's FSDP2 sharding (over the processes torchrun starts; one without it) and
      consolidate the final safetensors.
    batch: micro batch of step (0: the configuration's).
    device: where features runs (``cuda`` on a GPU machine).
    compile: features with the tower compiled (model.vision.compile).
    """

    which: list[str] = field(
        default_factory=lambda: ["images", "loader", "packing"],
        metadata={
            "positional": True,
            "choices": ("images", "loader", "packing", "cache", "features", "pretrain", "step"),
        },
    )
    samples: int = 64
    tiny: bool = False
    json: str | None = None
    fsdp: bool = False
    batch: int = 0
    device: str = "cpu"
    compile: bool = False


def bench(args: BenchArgs) -> int:
    from fvl.bench import run

    run(args.which, args.samples, args.tiny, args.json, args.fsdp, args.batch, args.device, args.compile)
    return 0


@dataclass
class NotebooksArgs:
    """Execute notebooks top to bottom in fresh kernels; executed copies go to --out.

    notebooks: notebook files (default: the shipped ones).
    out: folder for the executed copies.
    """

    notebooks: list[str] = field(default_factory=list, metadata=_POS)
    out: str = "outputs/notebooks"


def notebooks(args: NotebooksArgs) -> int:
    from fvl.eval.notebooks import execute, shipped_notebooks

    for nb in args.notebooks or [str(p) for p in shipped_notebooks()]:
        print(f"executed {nb} -> {execute(nb, args.out)}")
    return 0
