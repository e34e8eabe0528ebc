"""What ``LMMS_EVAL_PLUGINS=fvl.integrations.lmms_eval`` reads: model name -> class in ``models/<name>.py``."""

AVAILABLE_MODELS = {"fvl": "FVL"}
