"""Checkpoints in and out: others' made fvl's (``fvl import ...``, without running any code they ship), and
fvl's made folders that plain transformers loads (``fvl export``).

- ``florence2``: Microsoft's Florence-2 folders for remote code -> transformers' native Florence-2 layout
  (what ``model.vision.path`` loads);
- ``florence_vl``: the authors' Florence-VL checkpoints (a LLaVA fork) -> one fvl checkpoint;
- ``keys``: the strict key mapping both use (every source tensor used once, every target tensor filled);
- ``export``: ``export`` / ``load_exported``, transformers-loadable folders (and their image processors);
- ``files``: reading configs as JSON and weights as tensors (safetensors, ``torch.load(weights_only=True)``).
"""

from fvl.convert.export import export, load_exported
from fvl.convert.florence2 import import_florence2
from fvl.convert.florence_vl import import_florence_vl
from fvl.convert.keys import KeyMappingError

__all__ = ["KeyMappingError", "export", "import_florence2", "import_florence_vl", "load_exported"]
