"""The hyperparameter search (DESIGN §4b).

- ``study``: the Optuna study (sampler, pruner, storage), the objective (a staged fine-tune
  per trial), trials here or as Dask tasks, MLflow child runs, the summary
- ``plots``: the study's plots (history, importances, contours) for MLflow and the report

Rule: imports finetune, model, data, sources and runtime; nothing from evaluation,
registry or pipeline.
"""
