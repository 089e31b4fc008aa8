"""The machinery every phase runs on: stores, logs, locks, signals, processes.

- ``artifacts``: atomic writes, JSON, sha256 of files and objects, weights as safetensors
- ``tracking``: MLflow set-up (one place), the per-epoch logging hook, runs a killed
  process left RUNNING; ``study_storage``: the Optuna storage and its heartbeat
- ``services``: every configured service checked before the first step (one line, seconds)
- ``progress``: logging and progress bars; ``redact``: URL passwords masked, ``${ENV}``
- ``lock``: one run per project folder; ``interrupt``: SIGINT/SIGTERM clean-up (exit 130);
  ``critical``: store writes an interrupt waits for
- ``memory``: glibc's malloc thresholds for tensors; ``cluster``: the Dask fan-out

Rule (tests/test_house.py): nothing here imports a phase package (data, sources, model,
finetune, search, evaluation, registry, pipeline); only ``config`` and ``errors``.
"""
