"""fvl.cli.args: argparse parsers generated from typed, documented dataclasses."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from fvl.cli.args import build_parser, field_docs, parse


@dataclass
class EvalArgs:
    """Evaluate a checkpoint on benchmarks.

    Results are written as JSON: one file per benchmark.

    checkpoint: weights file, run folder or ``latest``.
    bench: ``synthetic`` or NAME=PATH (a parquet folder); repeatable.
    samples: synthetic test questions
      (100 per skill kind).
    batch_size / max_new_tokens: generation sizes.
    temperature: sampling temperature, 0 for 100% greedy.
    out: folder for the results.
    limit: at most this many questions.
    quiet: no progress bar.
    cache: reuse cached answers.
    verbose: log more.
    split: which split.
    sizes: image sizes.
    """

    checkpoint: str = field(default="latest", metadata={"positional": True})
    bench: list[str] = field(default_factory=list, metadata={"repeat": True})
    samples: int = 700
    batch_size: int = 32
    max_new_tokens: int = 16
    temperature: float = 0.0
    out: str | None = None
    limit: int | None = None
    quiet: bool = False
    cache: bool = True
    verbose: bool = field(default=False, metadata={"short": "-v"})
    split: str = field(default="test", metadata={"choices": ("train", "test")})
    sizes: list[int] = field(default_factory=lambda: [224, 448])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ValueError(f"--samples must be positive, got {self.samples}")


@dataclass
class ChatArgs:
    """Ask a checkpoint about an image."""

    checkpoint: str = field(metadata={"positional": True})
    question: list[str] = field(default_factory=list, metadata={"positional": True})
    image: str | None = None


@dataclass
class FilesArgs:
    paths: list[str] = field(metadata={"positional": True})
    out: str = field(metadata={"short": "-o"})


@dataclass
class Sched:
    """Learning-rate schedule.

    warmup: warmup steps.
    kind: schedule shape.
    """

    warmup: int = 100
    kind: str = field(default="cosine", metadata={"choices": ("cosine", "linear")})


@dataclass
class Optim:
    """Optimizer.

    lr: peak learning rate.
    betas: Adam betas.
    """

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    sched: Sched = field(default_factory=Sched)


@dataclass
class TrainArgs:
    """Train a stage.

    stage: pretrain or finetune.
    """

    stage: str = "pretrain"
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5))


@dataclass
class Clash:
    lr: float = 0.1
    optim: Optim = field(default_factory=Optim)


@dataclass
class NoDoc:
    x: int = 1


def _help(cls: type) -> str:
    return " ".join(build_parser(cls, "fvl test").format_help().split())


def _actions(cls: type) -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser(cls, "fvl test")._actions}


def test_field_docs_reads_entries_continuations_and_shared_lines():
    docs = field_docs(EvalArgs)
    assert docs["checkpoint"] == "weights file, run folder or latest."
    assert docs["samples"] == "synthetic test questions (100 per skill kind)."
    assert docs["batch_size"] == docs["max_new_tokens"] == "generation sizes."
    assert docs["bench"] == "synthetic or NAME=PATH (a parquet folder); repeatable."
    assert "Results are written as JSON" not in " ".join(docs.values())  # prose is not an entry
    assert "seed" not in docs and field_docs(NoDoc) == {}


def test_help_has_description_and_per_field_text():
    text = _help(EvalArgs)
    assert "Evaluate a checkpoint on benchmarks." in text
    assert "weights file, run folder or latest." in text
    assert "synthetic or NAME=PATH (a parquet folder); repeatable." in text
    assert "synthetic test questions (100 per skill kind). (default: 700)" in text
    assert text.count("generation sizes.") == 2
    assert "0 for 100% greedy" in text  # % is escaped for argparse
    assert "``" not in text
    assert build_parser(NoDoc, "fvl").description is None  # not @dataclass's "NoDoc(x: int = 1)"
    assert "Optimizer" not in _help(TrainArgs) and "peak learning rate." in _help(TrainArgs)


def test_help_shows_only_meaningful_defaults():
    acts = _actions(EvalArgs)
    assert acts["batch_size"].help == "generation sizes. (default: 32)"
    assert acts["sizes"].help == "image sizes. (default: 224 448)"
    assert acts["seed"].help == "(default: 0)"  # undocumented, but a zero default is shown
    assert acts["checkpoint"].help.endswith("(default: latest)")
    for dest in ("out", "quiet", "bench", "cache"):
        assert "default" not in acts[dest].help, dest


def test_scalar_types_and_defaults():
    assert parse(EvalArgs, [], "fvl eval") == EvalArgs()
    args = parse(EvalArgs, ["--samples", "5", "--temperature", "0.5", "--out", "res", "--limit", "3"], "fvl")
    assert (args.samples, args.temperature, args.out, args.limit) == (5, 0.5, "res", 3)
    assert isinstance(args.limit, int) and isinstance(args.temperature, float)
    with pytest.raises(SystemExit) as e:
        parse(EvalArgs, ["--samples", "many"], "fvl")
    assert e.value.code == 2


def test_bool_flags_both_ways():
    acts = _actions(EvalArgs)
    assert acts["quiet"].option_strings == ["--quiet"] and acts["cache"].option_strings == ["--no-cache"]
    assert acts["verbose"].option_strings == ["-v", "--verbose"]
    args = parse(EvalArgs, ["--quiet", "--no-cache", "-v"], "fvl")
    assert (args.quiet, args.cache, args.verbose) == (True, False, True)
    args = parse(EvalArgs, [], "fvl")
    assert (args.quiet, args.cache, args.verbose) == (False, True, False)
    with pytest.raises(SystemExit):
        parse(EvalArgs, ["--cache"], "fvl")


@dataclass
class Defaults:
    """Repeat with a default."""

    bench: list[str] = field(default_factory=lambda: ["synthetic"], metadata={"repeat": True})


def test_lists_with_nargs_and_repeat():
    args = parse(EvalArgs, ["--sizes", "64", "128", "--bench", "a", "--bench", "b=p"], "fvl")
    assert args.sizes == [64, 128] and args.bench == ["a", "b=p"]
    assert _actions(EvalArgs)["sizes"].nargs == "+"
    # a repeated option replaces a non-empty default instead of appending to it
    assert parse(Defaults, ["--bench", "x"], "fvl").bench == ["x"]
    assert parse(Defaults, [], "fvl").bench == ["synthetic"]


def test_choices_reject_bad_value(capsys):
    assert parse(EvalArgs, ["--split", "train"], "fvl").split == "train"
    with pytest.raises(SystemExit) as e:
        parse(EvalArgs, ["--split", "val"], "fvl")
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(TrainArgs, ["--kind", "step"], "fvl")


def test_positionals(capsys):
    acts = _actions(ChatArgs)
    assert acts["checkpoint"].option_strings == [] and acts["question"].nargs == "*"
    assert _actions(EvalArgs)["checkpoint"].nargs == "?" and _actions(FilesArgs)["paths"].nargs == "+"
    assert parse(ChatArgs, ["ckpt"], "fvl chat") == ChatArgs("ckpt", [], None)
    assert parse(EvalArgs, [], "fvl").checkpoint == "latest"
    assert parse(EvalArgs, ["run1"], "fvl").checkpoint == "run1"
    assert parse(FilesArgs, ["a", "b", "-o", "x"], "fvl") == FilesArgs(["a", "b"], "x")
    for cls, argv in ((ChatArgs, []), (FilesArgs, ["-o", "x"]), (FilesArgs, ["a"])):
        with pytest.raises(SystemExit):
            parse(cls, argv, "fvl")
        assert "required" in capsys.readouterr().err


def test_positionals_may_follow_options():
    args = parse(ChatArgs, ["ckpt", "--image", "x.png", "what", "colour?"], "fvl chat")
    assert args == ChatArgs(checkpoint="ckpt", question=["what", "colour?"], image="x.png")
    args = parse(ChatArgs, ["--image", "x.png", "ckpt", "why"], "fvl chat")
    assert args == ChatArgs(checkpoint="ckpt", question=["why"], image="x.png")


def test_nested_dataclasses_are_flattened_and_rebuilt():
    acts = _actions(TrainArgs)
    assert {"stage", "lr", "betas", "warmup", "kind"} <= set(acts)
    assert "optim" not in acts and "sched" not in acts
    text = _help(TrainArgs)
    assert "Train a stage." in text and "warmup steps. (default: 100)" in text
    assert "peak learning rate. (default: 0.5)" in text  # the outer default_factory's instance
    assert parse(TrainArgs, [], "fvl") == TrainArgs()
    args = parse(
        TrainArgs, ["--lr", "0.1", "--warmup", "5", "--kind", "linear", "--betas", "0.8", "0.9"], "fvl"
    )
    assert args == TrainArgs(optim=Optim(lr=0.1, betas=[0.8, 0.9], sched=Sched(warmup=5, kind="linear")))
    assert isinstance(args.optim, Optim) and isinstance(args.optim.sched, Sched)


def test_flattened_name_collision_is_an_error():
    with pytest.raises(ValueError, match=r"Clash\.lr.*Clash\.optim\.lr"):
        build_parser(Clash, "fvl")


def test_post_init_error_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(EvalArgs, ["--samples", "0"], "fvl eval")
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "usage: fvl eval" in err and "--samples must be positive, got 0" in err


@pytest.mark.parametrize(
    "annotation", ["dict[str, int]", "list[bool]", "bool | None", "int | str", "list", "complex"]
)
def test_unsupported_type_is_a_type_error(annotation):
    ns: dict = {}
    exec(f"from __future__ import annotations\n@dataclass\nclass Bad:\n    x: {annotation}\n", globals(), ns)
    with pytest.raises(TypeError, match=rf"Bad\.x.*{annotation.split('[')[0].split(' ')[0]}"):
        build_parser(ns["Bad"], "fvl")


def test_positional_bool_is_a_type_error():
    @dataclass
    class Bad:
        flag: bool = field(default=False, metadata={"positional": True})

    with pytest.raises(TypeError, match="flag"):
        build_parser(Bad, "fvl")


def test_parses_never_share_a_mutable_default():
    a, b = parse(EvalArgs, [], "fvl"), parse(EvalArgs, [], "fvl")
    a.bench.append("x")
    a.sizes.append(1)
    assert b.bench == [] and b.sizes == [224, 448] and EvalArgs().bench == []
    c, d = parse(TrainArgs, [], "fvl"), parse(TrainArgs, [], "fvl")
    c.optim.betas.append(0.5)
    assert d.optim.betas == [0.9, 0.999]
    e, f = parse(ChatArgs, ["x"], "fvl"), parse(ChatArgs, ["y"], "fvl")
    assert e.question is not f.question
