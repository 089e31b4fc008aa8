"""Adapting a trained model to a new domain (DESIGN §9): the model-, feature- and
instance-based transfer that needs no new labels.

- ``methods``: AdaBN (BatchNorm statistics of the target), CORAL (source features recoloured
  with the target's covariance), instance weights (a domain classifier's odds), confident
  pseudo-labels on the target: each a small function on a net or on features
- ``adapt``: config -> adapted model folder (`transferops adapt`): only when the new images
  differ from the training images (an MMD test); auxiliary labelled data weighed toward the
  target; scored on the labelled target sample when there is one (else the proxies, and says
  target accuracy is unknown), refused when it is worse there

Rule: imports evaluation's statistics, finetune's probe and engine helpers, data, model and
runtime; nothing from registry or above.
"""
