"""The registered model as an MLflow pyfunc: raw images or texts in, labels out.

``mlflow.pyfunc.load_model("models:/<name>@champion")`` gives a model whose ``predict`` takes

- images: a DataFrame with an ``image`` column of encoded image bytes (JPEG, PNG, ...) or
  file paths, or a plain list of either;
- texts: a DataFrame with a ``text`` column, or a list of strings;

and returns a DataFrame with ``label`` (class name), ``confidence`` (its probability) and
``probabilities`` (one per class, in ``class_names`` order, which is in the model's
metadata). The model folder inside the MLflow model is the same ``finetune.out`` folder
`train` writes (safetensors weights + ``model.json``): nothing is pickled. transferops' code
travels with the model (``code_paths``: the inference modules only, see
:data:`transferops.registry.register.SHIPPED_MODULES`), so loading it does not need
transferops installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from transferops.errors import DataError
from transferops.model.folder import load_finetuned
from transferops.model.inputs import pick_device
from transferops.model.predict import predict_probs, raw_inputs

INPUT_COLUMN = {"image": "image", "text": "text"}


class TransferopsModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a fine-tuned model folder (artifact ``model``)."""

    # The signature logged with the model is its input schema; without this MLflow warns,
    # when the class is defined (in every process that registers or serves), that type
    # hints on `predict` could infer one
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the folder's safetensors weights."""
        self.model_dir = Path(context.artifacts["model"])
        self.net, self.spec = load_finetuned(self.model_dir)
        self.device = pick_device("auto")

    # No type hint on model_input: MLflow would read it as the input schema (the signature
    # logged with the model is the schema).
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Labels and probabilities for raw images (bytes or paths) or texts -> DataFrame."""
        items = _items(model_input, INPUT_COLUMN[self.spec["modality"]])
        probs = predict_probs(
            self.net, self.spec, raw_inputs(self.spec, self.model_dir, items), self.device
        )
        names = self.spec["class_names"]
        return pd.DataFrame(
            {
                "label": [names[i] for i in probs.argmax(1)],
                "confidence": probs.max(1).astype(float) if len(probs) else [],
                "probabilities": [p.astype(float).tolist() for p in probs],
            }
        )


def _items(model_input: Any, column: str) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            if len(model_input.columns) != 1:
                raise DataError(
                    f"model input: expected a column {column!r}, got {list(model_input.columns)}"
                )
            column = model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, str | bytes | Path):
        return [model_input]
    if isinstance(model_input, dict) and column in model_input:
        value = model_input[column]
        return list(value) if isinstance(value, list | tuple) else [value]
    return list(model_input)
