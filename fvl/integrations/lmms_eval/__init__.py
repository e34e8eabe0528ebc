"""lmms-eval's model ``fvl``: ``lmms-eval --model fvl --model_args checkpoint=PATH --tasks ...`` scores an fvl
checkpoint (a safetensors file from ``save_checkpoint``, a run folder, ``latest`` or a folder written by
``fvl export``) with lmms-eval's own tasks, answering with the generation path of ``fvl eval``.

How lmms-eval finds it:
- lmms-eval >= 0.6: the entry point ``lmms_eval.models`` of fvl's package metadata (``pyproject.toml``) names
  ``manifest`` below; installing fvl is all it takes.
- any release (deprecated from 0.6 on, where it warns): ``LMMS_EVAL_PLUGINS=fvl.integrations.lmms_eval``, which
  reads ``AVAILABLE_MODELS`` from this package's ``models`` module.

The class is ``models/fvl.py``'s ``FVL`` (the module path both mechanisms build from the model name); what it
does with lmms-eval's requests, which needs no lmms-eval, is in ``requests.py``.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "fvl"
CLASS_PATH = "fvl.integrations.lmms_eval.models.fvl.FVL"


def manifest() -> Any:
    """lmms-eval's ``ModelManifest`` for ``--model fvl`` (what the entry point hands lmms-eval >= 0.6)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
