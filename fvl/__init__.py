"""fvl: a PyTorch Lightning experiment kit for Florence-VL (Florence-2 depth-breadth fusion into LLMs)."""

__version__ = "0.1.0"
