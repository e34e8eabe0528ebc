"""``fvl eval``, ``fvl chat``, ``fvl align``, ``fvl pca`` and ``fvl notebooks``: scoring and looking at
checkpoints."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from fvl.cli.args import POSITIONAL as _POS
from fvl.config.eval import AlignConfig, EvalConfig, PCAConfig
from fvl.config.tracking import DEFAULT_EXPERIMENT

ALIGN_VARIANTS = ("dbfusion", "minus_davit", "minus_caption", "minus_ocr", "minus_grounding", "davit_only")


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
    from fvl.config.tracking import TrackingConfig
    from fvl.eval.evaluate import evaluate_checkpoint, print_results

    tracking = TrackingConfig(experiment=args.experiment) if args.experiment else None
    report = evaluate_checkpoint(
        args.checkpoint, args.eval, args.runs, args.out, tracking, progress=not args.quiet
    )
    for result in report.results:
        print_results(result)
    if report.results:
        print(f"results: {', '.join(str(p) for p in report.paths)}; MLflow run {report.mlflow_run_id}")
    for bench, why in report.failures.items():  # each failed alone; the others' results are kept above
        print(f"fvl eval: {bench} failed: {why}", file=sys.stderr)
    return 1 if report.failures else 0


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
        from fvl.models import build_model, load_for_inference
        from fvl.util import resources

        if not Path(self.model).exists() and self.model in resources.names("experiments", "models"):
            from fvl.config import load

            return build_model(load(self.model).model).eval()
        return load_for_inference(self.model, self.runs)

    def log(self, kind: str, files: list[Path]) -> str:
        from fvl.config.tracking import TrackingConfig
        from fvl.runs.tracking import analysis_run

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
    from fvl.eval.align import alignment_analysis, format_table, parse_variant, write_results
    from fvl.util import resources

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

    from fvl.eval.pca import pca_panels, write_pca
    from fvl.synthetic import generate

    model = args.target.load_model()
    c = args.pca
    size = model.processor.transform.size  # the decode every tower reads (the largest tower's size)
    image = (
        Image.open(c.image).convert("RGB") if c.image else generate(c.index, "test", image_size=size).image
    )
    panels = pca_panels(model, image, c.feature or None, c.threshold)
    png, csv_path = write_pca(image, panels, args.out)
    print(
        f"wrote {png} ({len(panels)} panels) and {csv_path}; MLflow run {args.target.log('pca', [png, csv_path])}"
    )
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
