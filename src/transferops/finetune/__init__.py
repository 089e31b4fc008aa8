"""Staged fine-tuning (DESIGN §4).

- ``blocks``: block discovery; a source model as ordered blocks + pool + new head
- ``engine``: the stage loop (freeze plan, per-depth LRs, feature cache, checkpoints)
- ``train``: config -> trained model folder (`transferops train`), and reloading it
"""
