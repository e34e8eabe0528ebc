"""What an evaluation iterates over: ``EvalSample`` (one question, its images as lazy references) and
``Benchmark`` (the samples plus the spec that prompts, scores and aggregates them).

Images are references, decoded batch by batch (``EvalSample.load_images``): a benchmark such as VQAv2 val
(214k questions) or DocVQA val would not fit in memory if every image were decoded at load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from fvl.eval.benchmarks.spec import BenchmarkSpec

ImageRef = Callable[[], Image.Image]


@dataclass
class EvalSample:
    """One question. ``prompt`` is the text after the image placeholders (the model puts one placeholder
    line per image before it, as lmms-eval's llava does); ``references`` is empty on a test split (no
    answers: the evaluation writes a submission file instead of scoring); ``fields`` keeps the row's
    values that scoring, aggregation or the submission need (ids, categories, the raw answer)."""

    id: str
    prompt: str
    references: list[str]
    group: str = "all"  # per-skill / per-category breakdown
    options: list[str] | None = None
    image_refs: list[ImageRef] = field(default_factory=list, repr=False)
    fields: dict[str, Any] = field(default_factory=dict, repr=False)

    def load_images(self) -> list[Image.Image]:
        """The sample's images, decoded now (RGB)."""
        images = []
        for ref in self.image_refs:
            try:
                images.append(ref())
            except Exception as e:  # name the sample: a bad image deep in a benchmark must be findable
                raise ValueError(f"sample {self.id}: cannot decode its image: {e}") from e
        return images


@dataclass
class Benchmark:
    """Samples with the spec that prompts and scores them. ``labelled`` is False on a test split, whose
    answers are withheld: predictions then go to a submission file."""

    name: str
    spec: BenchmarkSpec
    samples: list[EvalSample]
    chance: dict[str, float] = field(default_factory=dict)
    read_split: str = ""  # the split read, when not the spec's (``NAME:SPLIT=PATH``)

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def labelled(self) -> bool:
        return bool(self.samples) and bool(self.samples[0].references)

    @property
    def split(self) -> str:
        """The split these samples come from (the spec's, unless ``NAME:SPLIT=PATH`` named another)."""
        return self.read_split or self.spec.split

    @property
    def result_name(self) -> str:
        """The name of this run's results (JSON file, MLflow keys ``eval/<name>/...``): the benchmark's for
        its reported split, ``<name>_<split>`` for another, so a test split never overwrites the val scores."""
        return self.name if self.split == self.spec.split else f"{self.name}_{self.split}"

    @property
    def task(self) -> str:
        """The lmms-eval task of this split: the spec's task, its ``_val`` / ``_dev`` / ``_validation`` suffix
        replaced by the split's name for another split (``docvqa_val`` -> ``docvqa_test``)."""
        if self.split == self.spec.split:
            return self.spec.task
        for suffix in ("_validation", "_val", "_dev"):
            if self.spec.task.endswith(suffix):
                return self.spec.task[: -len(suffix)] + f"_{self.split}"
        return f"{self.spec.task} ({self.split} split)"
