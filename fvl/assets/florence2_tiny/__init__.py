"""Stage 0: a tiny Florence-2 trained on its own tasks (``fvl florence2-tiny``)."""
