"""transferops: a reproducible transfer-learning pipeline.

The same functions serve the CLI (`transferops ...`), the Prefect flow
(`transferops.pipeline.flow`), DVC stages (`dvc.yaml`) and Python::

    from transferops import load_config, prepare
    cfg = load_config("params.yaml", ["data.limit_per_class=10"])
    result = prepare(cfg)
"""

import os

# Hugging Face's per-file "Loading weights" / "Writing model shards" bars, once per training
# run, drown transferops' own progress; `transferops -v` shows them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from transferops.config import Config, load_config
from transferops.data.prepare import prepare
from transferops.data.prepared import PreparedData, load_prepared, prepared_data_hash

__all__ = [
    "Config",
    "PreparedData",
    "load_config",
    "load_prepared",
    "prepare",
    "prepared_data_hash",
]
__version__ = "0.1.0"
