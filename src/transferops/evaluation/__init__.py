"""Is the model worth it? Everything measured against something else (DESIGN §5).

- ``drift``: new data? drifted from the champion's? (``schedule.retrain``)
- ``baseline``: transfer / scratch / probe over seeds, the few-shot curve
- ``evaluate``: the test split, read here only: metrics, intervals, the verdict
- ``report``: markdown + plots; ``stats``: t-interval over seeds, paired bootstrap, ECE

Rule: imports search, finetune, model, data, sources and runtime; nothing from registry or
pipeline.
"""
