"""After evaluation: the MLflow registry and what leaves it (DESIGN §6).

- ``register``: a model version of ``finetune.out`` (pyfunc + shipped inference code),
  alias challenger; ``lineage``: its tags; ``model_card``: its card
- ``promote``: evidence lookup and the gate (a pure function over numbers -> Decision)
- ``export``: the registered model as ONNX, published only if ONNX Runtime matches
- ``client``: the aliases; resolve ``models:/<name>@<alias>`` and download a version,
  weights verified
  (also read by ``sources.mlflow``: a registered model as a new source)
- ``predict_registered``: `transferops predict` on a registered model

Rule: imports evaluation and below; nothing from pipeline.
"""
