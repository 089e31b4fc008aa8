"""The whole run, and the doors that start it on schedule.

- ``run``: the steps, their order, fingerprints and stamps (`run_pipeline`)
- ``flow``: the Prefect flow over `run_pipeline` (one task per step)
- ``deployment``: served (`transferops serve`) or on a work pool (`transferops deploy`)
- ``dvc_lock``: a whole run by another door recorded in dvc.lock
- ``ui``: `transferops ui` (MLflow and optuna-dashboard on the project's stores)
- ``project``: `transferops init` (params.yaml, dvc.yaml, ignore files for the user's data)

Rule: the top of the house; only ``cli`` imports it.
"""
