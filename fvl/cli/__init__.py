"""The ``fvl`` command: a table of names to typed functions, one module per command family (``models``,
``data``, ``train``, ``sweep``, ``eval``, ``convert``, ``bench``), each parser generated from the function's
argument dataclass (``fvl.cli.args``). ``-v`` anywhere logs at INFO level and shows
tracebacks; without it, a bad config key, value, path or name ends in one line that says what to fix."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fvl.cli import bench, convert, data, models, sweep, train
from fvl.cli import eval as evaluation
from fvl.cli.args import description, parse

COMMANDS: dict[str, tuple[type, Callable[[Any], int]]] = {
    "info": (models.InfoArgs, models.info),
    "train": (train.TrainArgs, train.train),
    "sweep": (sweep.SweepArgs, sweep.sweep),
    "eval": (evaluation.EvalArgs, evaluation.evaluate),
    "chat": (evaluation.ChatArgs, evaluation.chat),
    "align": (evaluation.AlignArgs, evaluation.align),
    "pca": (evaluation.PCAArgs, evaluation.pca),
    "export": (convert.ExportArgs, convert.export),
    "shards build": (data.ShardsBuildArgs, data.shards_build),
    "shards merge": (data.ShardsMergeArgs, data.shards_merge),
    "features build": (data.FeaturesBuildArgs, data.features_build),
    "florence2-tiny": (train.Florence2TinyArgs, train.florence2_tiny),
    "import florence2": (convert.ImportFlorence2Args, convert.import_florence2),
    "import florence-vl": (convert.ImportFlorenceVLArgs, convert.import_florence_vl),
    "checkpoints consolidate": (convert.ConsolidateArgs, convert.consolidate),
    "bench": (bench.BenchArgs, bench.bench),
    "notebooks": (evaluation.NotebooksArgs, evaluation.notebooks),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: fvl [-v] COMMAND [ARGS]   (fvl COMMAND -h for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description(cls)}" for name, (cls, _) in COMMANDS.items()]
    return "\n".join(lines)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    fvl_log = logging.getLogger("fvl")
    fvl_log.handlers = [handler]
    fvl_log.setLevel(logging.INFO if verbose else logging.WARNING)
    fvl_log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if name not in COMMANDS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cls, func = COMMANDS[name]
    args = parse(cls, argv[len(name.split()) :], prog=f"fvl {name}")
    _setup_logging(verbose)
    if verbose:
        return int(func(args) or 0)
    from fvl.config import ConfigError
    from fvl.data.feature_cache.store import FeatureCacheError
    from fvl.data.recipes import RecipeError

    try:
        return int(func(args) or 0)
    except (ConfigError, RecipeError, FeatureCacheError, FileNotFoundError, ValueError, KeyError) as e:
        # What a user can fix (a key, a value, a path, a name) in one line; -v shows the traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        first = (str(message).strip().splitlines() or [type(e).__name__])[0]
        print(f"fvl {name}: error: {first} (-v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
