"""The thawed blocks' learning rate on text encoders: ``finetune.block_lr_scale``.

Block j from the top trains at ``lr * block_lr_scale * layer_decay**j`` (AdamW). The search's
head lrs run 3e-4..3e-2, so at scale 1 MiniLM's top layer trains at 1.8e-3 for the middle lr
0.003: some 40x what BERT-style encoders are usually fine-tuned with (2e-5..5e-5). This script is
``bench/fixed.py`` with ``--param finetune.block_lr_scale``: each case prepared once, fixed
configurations only, every scale x (head lr, depth) x seed scored on val and test beside
the exact probe (the model fine-tuning starts from and must beat). Test is read only to
report.

    .venv/bin/python bench/text_lr.py --cases debian-10-k40,fortunes-k40 --out /tmp/tl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fixed import run, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="debian-10-k40")
    ap.add_argument("--scales", default="1,0.1,0.03")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("/tmp/text_lr"))
    args = ap.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for case in args.cases.split(","):
        rows += run(case, args.out.resolve(), "finetune.block_lr_scale", scales, seeds)
    print(table(rows, "finetune.block_lr_scale"))


if __name__ == "__main__":
    main()
