"""Grids of runs (``fvl sweep``): the grid, its runs side by side, each run's evaluation, and the executed
comparison notebook of a launch. Sits above training and evaluation, which never import it."""
