"""The Prefect door of the design card: the `transfer-pipeline` flow, defined in the package
(:mod:`transferops.pipeline.flow`) so that an installed transferops has it too.

    prefect deployment build flows/transfer_pipeline.py:transfer_pipeline ...   # or
    transferops serve / transferops deploy
"""

from transferops.pipeline.flow import transfer_pipeline

__all__ = ["transfer_pipeline"]
