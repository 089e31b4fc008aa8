"""Source models: the pretrained weights a fine-tune starts from.

- ``pull``: `transferops pull` (resolve, write ``source.out/`` with its manifest, a second
  pull of the same spec does nothing) and :func:`~transferops.sources.pull.load_source`
- one module per ``source.kind``: ``torchvision``, ``efficientnet_lite``, ``hf``, ``local``,
  ``mlflow`` (a registered transferops model, read through ``registry.client``); each first
  decides where the weights come from (``resolve``), then loads them (``load``)
- ``manifest``: the one writer of a source folder, and its checksum verification

Nothing is ever unpickled: safetensors, or ``torch.load(weights_only=True)``.
Rule: imports model and runtime (and ``registry.client`` for the mlflow kind).
"""
