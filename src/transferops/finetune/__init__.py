"""Staged fine-tuning (DESIGN §4).

- ``blocks``: StagedNet (blocks -> pool -> head) and the per-family splitters
- ``plan``: the stage plan (which blocks thaw when, for how many epochs), LR schedule
- ``thaw``: freeze / make_trainable / unfreeze_and_add_param_group, the thaw policy
- ``probe``: the exact linear probe (the head's start and the floor fine-tuning must beat)
- ``cache``: frozen-prefix features, computed once per stage
- ``checkpoint``: resume state, saved atomically after every epoch
- ``engine``: the loop; ``train``: config -> model folder (`transferops train`)

Only ``blocks`` ships with a registered model; the rest is training code.
"""
