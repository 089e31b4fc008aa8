"""The model as a registered version ships it: exactly this package, plus ``errors`` and
``runtime.artifacts``.

- ``families``: THE table of model families (splitter, normalisation, channels_last, pip
  requirement), building an architecture by name, StagedNet construction
- ``blocks``: StagedNet (blocks -> pool -> head; encode / decode at any block), splitters
- ``inputs``: the one image decoder, input normalisation + augmentation, tokenising, device
- ``folder``: a model folder in and out (``model.json``, ``model.safetensors``), its
  weights verified on every load
- ``predict``: probabilities from a model folder (``calibration``: its temperature, fitted
  on val, applied); ``serving``: the MLflow pyfunc;
  ``_pyfunc_entry``: its "models from code" entry point

Rule (tests/test_house.py): nothing here imports finetune, search, evaluation, registry,
pipeline, data or sources: serving a model never reaches training code.
"""
