"""Things fvl builds once, on first use, into its cache under one lock: the tiny tokenizers
(``tiny_tokenizers``), and the towers a ``builtin:NAME`` path names (``builtin``), among them stage 0's tiny
Florence-2 trained on its own tasks (``florence2_tiny/``)."""
