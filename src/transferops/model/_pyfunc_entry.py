"""MLflow "models from code" entry point of the registered model (see serving.py)."""

from mlflow.models import set_model

from transferops.model.serving import TransferopsModel

set_model(TransferopsModel())
