"""``python -m fvl.cli``: the ``fvl`` command."""

import sys

from fvl.cli import main

sys.exit(main())
