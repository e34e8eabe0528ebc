"""The ``fvl`` command: a table of names to typed functions (``fvl.cli.commands``), each parser generated
from the function's argument dataclass (``fvl.cli.args``). ``-v`` anywhere logs at INFO level and shows
tracebacks; without it, a bad config key, value, path or name ends in one line that says what to fix."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fvl.cli import commands as c
from fvl.cli import interop_commands as i
from fvl.cli.args import description, parse

COMMANDS: dict[str, tuple[type, Callable[[Any], int]]] = {
    "info": (c.InfoArgs, c.info),
    "train": (c.TrainArgs, c.train),
    "sweep": (c.SweepArgs, c.sweep),
    "eval": (c.EvalArgs, c.evaluate),
    "chat": (c.ChatArgs, c.chat),
    "align": (c.AlignArgs, c.align),
    "pca": (c.PCAArgs, c.pca),
    "export": (c.ExportArgs, c.export),
    "shards build": (c.ShardsBuildArgs, c.shards_build),
    "shards merge": (c.ShardsMergeArgs, c.shards_merge),
    "features build": (c.FeaturesBuildArgs, c.features_build),
    "florence2-tiny": (c.Florence2TinyArgs, c.florence2_tiny),
    "import florence2": (i.ImportFlorence2Args, i.import_florence2),
    "import florence-vl": (i.ImportFlorenceVLArgs, i.import_florence_vl),
    "bench": (c.BenchArgs, c.bench),
    "notebooks": (c.NotebooksArgs, c.notebooks),
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
    from fvl.data.feature_cache import FeatureCacheError
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
