"""Everything that fits weights (DESIGN §4).

- ``plan``: the stage plan (which blocks thaw when, for how many epochs), LR schedule
- ``thaw``: freeze / make_trainable / unfreeze_and_add_param_group, the thaw policy
- ``probe``: the exact linear probe (the head's start and the floor fine-tuning must beat);
  ``features``: a frozen source's pooled features (probe, source ranking, drift check);
  ``balance``: class weights for imbalanced training data
- ``cache``: frozen-prefix features, computed once per stage
- ``checkpoint``: resume state, saved atomically
- ``adapters``: LoRA (peft) for HF encoders
- ``engine``: the loop; ``train``: config -> model folder (`transferops train`);
  ``calibrate``: the model to register's temperature, fitted on val
- ``classical``: logistic regression on pixels / TF-IDF (a reference, and a candidate);
  ``logreg``: sklearn's logistic regression on one BLAS thread, as a linear head

Rule: imports sources, data, model and runtime; nothing from search or above. The model's
own structure (blocks, families) lives in ``model``: a registered model never ships this.
"""
