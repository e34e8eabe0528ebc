"""Model inputs, shared by the data side and the models: ``collate`` (``Sample``, padding into a batch),
``transform`` (image bytes -> the tower's ``uint8`` tensor), ``processor`` (conversation + images ->
``Sample``: token ids, exact labels, image tensors)."""
