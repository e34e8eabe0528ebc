"""``fvl bench`` and ``python -m fvl.bench``: one module per benchmark (``step``, ``images``, ``loader``,
``features``, ``packing``, ``cache``, ``pretrain``), run and recorded by ``runner``."""
