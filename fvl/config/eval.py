"""Typed schema of the evaluation and analysis options: ``eval:`` in an experiment YAML (what sweeps score),
and the options of ``fvl eval``, ``fvl align`` and ``fvl pca`` (their parsers are generated from these)."""

from __future__ import annotations

from dataclasses import dataclass, field

# lmms-eval's VQAv2 scoring (``vqav2_process_results``) changed twice; EvalAIAnswerProcessor and TextVQA's (and
# VizWiz's) scoring did not change from 0.2.4 to 0.7.3. Each protocol is named after the first release with
# its behaviour (``fvl.eval.metrics.vqa_score`` implements them; tests/eval/lmms_eval_vqa_protocol_cases.json
# holds each release's own outputs). Here, beside the option, because this module must not import torch.
VQA_PROTOCOLS: dict[str, str] = {
    "lmms-eval-0.3.0": "lmms-eval 0.2.4 to 0.3.0 (the paper's)",
    "lmms-eval-0.3.5": "lmms-eval 0.3.5 to 0.4.0",
    "lmms-eval-0.5.0": "lmms-eval 0.5.0 to 0.7.3 (the latest checked)",
}
VQA_PROTOCOL_ALIASES = {"current": "lmms-eval-0.5.0"}


def vqa_protocol(name: str) -> str:
    """A VQA protocol's name, ``current`` resolved to the latest one; an unknown name is a ValueError."""
    name = VQA_PROTOCOL_ALIASES.get(name, name)
    if name not in VQA_PROTOCOLS:
        known = ", ".join([*VQA_PROTOCOLS, *VQA_PROTOCOL_ALIASES])
        raise ValueError(f"unknown VQA protocol {name!r}: expected one of {known}")
    return name


@dataclass
class DuringTrainingConfig:
    """Benchmark scores while a run trains (``eval.during_training``): at every N-th optimizer step the
    current weights answer each benchmark as ``fvl eval`` does (greedy, the benchmark's own prompts,
    ``max_new_tokens`` and scoring) and ``eval/<benchmark>/<metric>`` goes to the run's MLflow record at that
    step, with ``eval/during_training/seconds`` (what it cost). The questions are split over the ranks (FSDP:
    rank 0 answers them all from the gathered weights); a resumed run evaluates no step twice.

    every_n_steps: evaluate every N optimizer steps (0: never).
    benchmarks: what to score, named as ``eval.bench`` names them (``synthetic``, NAME=PATH); empty: the
      synthetic test split.
    limit: questions per benchmark: the first K of a public one, K synthetic questions (0: all of a public
      benchmark, ``eval.samples`` synthetic ones).
    """

    every_n_steps: int = 0
    benchmarks: list[str] = field(default_factory=list)
    limit: int = 0

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.limit < 0:
            raise ValueError("eval.during_training: every_n_steps and limit must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def bench(self) -> list[str]:
        return list(self.benchmarks) or ["synthetic"]


@dataclass
class EvalConfig:
    """Scoring a checkpoint. Each public benchmark is read, prompted, generated and scored as lmms-eval
    0.3.0 ran it for the paper (the README's evaluation table); the options below change that only when set.

    bench: ``synthetic`` (the generated test split, per skill) or NAME=PATH (NAME:SPLIT=PATH for another
      split) for a local parquet copy of a public benchmark (textvqa, vqav2, vizwiz, gqa, pope, chartqa,
      docvqa, infovqa, mmbench, seed, ai2d, scienceqa_img); repeatable. A split without answers writes the
      submission file of its evaluation server instead of scores.
    samples: synthetic test questions (100 per skill kind at 700); 0 skips evaluation in a sweep.
    limit: score only the first N questions of each public benchmark (0: all).
    batch_size: prompts generated together (greedy, KV cache). The paper's numbers were generated one
      prompt at a time (lmms-eval's llava runs at batch 1): use 1 to reproduce them exactly; batched bf16
      decoding can flip a few greedy answers (see agreement).
    max_new_tokens: longest answer (default: each benchmark's own, e.g. 16 for VQAv2 and GQA, 32 for
      DocVQA, 128 for POPE, 1024 for TextVQA, VizWiz, MMBench and SEED).
    pope_parser: lmms-eval (only an exact "yes" / "no" counts) or llava (LLaVA's eval_pope.py parsing).
    vqa_protocol: VQAv2's scoring as lmms-eval-0.3.0 (0.2.4 to 0.3.0, the paper's), lmms-eval-0.3.5 (0.3.5
      to 0.4.0) or lmms-eval-0.5.0 (0.5.0 to 0.7.3; current is the same) scored it; the other benchmarks'
      scoring is 0.3.0's whatever this says.
    agreement: also answer the first N questions of each benchmark one at a time and report the share of
      answers equal to the batched ones (0: off).
    device: where the model answers: auto (the GPU when there is one), cpu, cuda, cuda:N.
    dtype: the model's weights while answering: auto (bfloat16 on a GPU, float32 on the CPU), bfloat16,
      float16 (lmms-eval's llava loads LLaVA checkpoints in float16), float32.
    during_training: benchmark scores at steps of a training run (``DuringTrainingConfig``; experiment
      YAML only).
    """

    bench: list[str] = field(default_factory=lambda: ["synthetic"], metadata={"repeat": True})
    samples: int = 700
    limit: int = 0
    batch_size: int = 32
    max_new_tokens: int | None = None
    pope_parser: str = "lmms-eval"
    vqa_protocol: str = "lmms-eval-0.3.0"
    agreement: int = 0
    device: str = "auto"
    dtype: str = "auto"
    during_training: DuringTrainingConfig = field(
        default_factory=DuringTrainingConfig, metadata={"cli": False}
    )

    def __post_init__(self) -> None:
        if self.samples < 0 or self.limit < 0 or self.agreement < 0 or self.batch_size <= 0:
            raise ValueError("eval: samples, limit and agreement must be >= 0 and batch_size positive")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError("eval: max_new_tokens must be positive")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"eval: dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")
        if self.pope_parser not in ("lmms-eval", "llava"):
            raise ValueError(f"eval: pope_parser must be lmms-eval or llava, not {self.pope_parser!r}")
        self.vqa_protocol = vqa_protocol(self.vqa_protocol)  # "current" recorded as the release it stands for

    def placement(self) -> tuple[str, str]:
        """(device, dtype) with ``auto`` resolved on this machine."""
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        dtype = (
            ("bfloat16" if device.startswith("cuda") else "float32") if self.dtype == "auto" else self.dtype
        )
        return device, dtype

    def protocol(self) -> dict[str, str]:
        """The protocol options that differ between benchmarks' evaluators (each spec takes its own)."""
        return {"pope_parser": self.pope_parser, "vqa_protocol": self.vqa_protocol}


@dataclass
class AlignConfig:
    """The paper's vision-language alignment (frozen tower and LLM, a trained MLP projection), scored on
    held-out caption pairs over several seeds.

    variant: fusion YAML or LABEL=FUSION:feature+feature, e.g. -ocr=dbfusion:davit+caption+grounding;
      repeatable (default: dbfusion, its four leave-one-out ablations and davit alone).
    steps: optimisation steps per variant and seed.
    batch_size: caption pairs per step (the softmax runs over the batch); also the size of the held-out
      batches that retrieval is scored in (top-1 chance 1/batch_size).
    samples: caption pairs used (synthetic ones, or the first usable lines of captions); at least
      2 x batch_size.
    captions: JSON-lines file of real pairs, one {"image": PATH, "caption": TEXT} per line, image paths
      relative to the file's folder (default: synthetic captions).
    heldout: fraction of the pairs held out for scoring (rounded to whole batches), never trained on.
    seeds: runs per variant, with seeds seed, seed+1, ...: each changes the projection init, the batch
      order and the train / held-out split; results are reported as mean and std over them.
    hidden: hidden width of the Linear-GELU-Linear projection, the same for every variant.
    lr: Adam learning rate of the projection.
    temperature: softmax temperature of the matching logits.
    seed: first random seed.
    """

    variant: list[str] = field(default_factory=list, metadata={"repeat": True})
    steps: int = 200
    batch_size: int = 64
    samples: int = 1024
    captions: str | None = None
    heldout: float = 0.25
    seeds: int = 3
    hidden: int = 512
    lr: float = 1e-3
    temperature: float = 0.07
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 1 or self.samples < 2 * self.batch_size:
            raise ValueError("align: steps positive, batch_size > 1, samples >= 2 x batch_size")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("align: lr and temperature must be positive")
        if not 0 < self.heldout < 1:
            raise ValueError(f"align: heldout={self.heldout} must be a fraction in (0, 1)")
        if self.seeds < 1 or self.hidden < 1:
            raise ValueError("align: seeds and hidden must be >= 1")
        if self.captions is not None and not self.captions.strip():
            raise ValueError("align: captions must be a file path (or left out for synthetic captions)")


@dataclass
class PCAConfig:
    """The first three principal components of each named vision feature, shown as RGB (the paper's Fig. 3).

    image: image file (default: a synthetic test image).
    index: synthetic test image index when no image is given.
    feature: feature names (default: all the tower has); repeatable.
    threshold: first-component threshold below which a token counts as background (shown black).
    """

    image: str | None = None
    index: int = 0
    feature: list[str] = field(default_factory=list, metadata={"repeat": True})
    threshold: float = 0.5
