"""Data in: the labelled target data, read and fixed into hashed splits once.

- ``readers``: an image folder (with or without split folders) or a table (CSV, TSV,
  JSONL): lists examples and checks the layout, cheaply
- ``demo``: the built-in demo sets (digits, fortunes), written from installed packages
- ``prepare``: `transferops prepare`: split, decode once, hash (no-op when unchanged)
- ``prepared``: the prepared format every later step reads (manifest, splits)

Rule: imports model (the one image decoder) and runtime; nothing above.
"""
