"""``python -m fvl.bench step``: the same as ``fvl bench step`` (an entry point: it may import the CLI)."""

import sys

from fvl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
