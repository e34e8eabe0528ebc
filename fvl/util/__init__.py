"""The bottom layer: small mechanisms every other package may use and that import nothing of fvl's.

``registry`` (name -> factory), ``resources`` (the YAML files and notebooks that ship in the package),
``extras`` (optional dependencies with an install hint), ``threads`` (torch's CPU threads beside DataLoader
workers), ``locks`` (one process builds a shared folder while the others wait).
"""
