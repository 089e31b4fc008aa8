"""Resume: where a fine-tune is, saved atomically after every epoch and loaded on a rerun.

A checkpoint resumes only a run with the same fingerprint (data, source, trajectory params),
and restores the global RNG, so the resumed run ends bit-exactly where an uninterrupted one
would.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from transferops.finetune.probe import paired_se
from transferops.model.blocks import StagedNet

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Progress of a fine-tune besides the live weights: what a checkpoint holds."""

    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    best: tuple[float, float] = (-1.0, -math.inf)  # (val accuracy, -val loss) of best_state
    stage: int = 0  # the stage to run next ...
    next_epoch: int = 0  # ... from this epoch
    stage_done: bool = False  # ... unless it already finished (early stop or last epoch)
    avg_state: dict[str, torch.Tensor] | None = None  # mean weights of the averaged epochs
    avg_count: int = 0
    average: dict[str, Any] | None = None  # the average's val score, once the last stage ended
    # the exact probe's per-example val correctness: an epoch is kept only if it beats it
    # by `beat_by` paired standard errors; whether the best state is still that probe
    probe_correct: torch.Tensor | None = None
    beat_by: float = 0.0
    from_probe: bool = False

    @classmethod
    def fresh(cls, net: StagedNet) -> RunState:
        """Nothing trained yet: the best weights so far are the initial ones."""
        return cls(best_state=copy.deepcopy(net.state_dict()))

    def beats_probe(self, correct: torch.Tensor | None) -> bool:
        """Whether per-example val correctness `correct` beats the exact probe's by more than
        ``beat_by`` standard errors of the paired difference (any gain, or a tie, with 0)."""
        if self.probe_correct is None or correct is None:
            return True
        d = (correct.cpu().double() - self.probe_correct.double()).numpy()
        gain = float(d.mean())
        return gain >= self.beat_by * paired_se(d) and (self.beat_by == 0 or gain > 0)

    def improve(
        self,
        net: StagedNet,
        val_accuracy: float,
        val_loss: float,
        correct: torch.Tensor | None = None,
    ) -> bool:
        """Keep the weights if this is the best validation so far (accuracy, then loss) and
        beats the exact probe beyond noise (`correct`: per-example val correctness)."""
        if (val_accuracy, -val_loss) > self.best and self.beats_probe(correct):
            self.best = (val_accuracy, -val_loss)
            self.from_probe = False
            self.best_state = copy.deepcopy(net.state_dict())
            return True
        return False

    def add_to_average(self, net: StagedNet) -> None:
        """Fold this epoch's weights into the running mean (integer buffers: the latest)."""
        self.avg_count += 1
        if self.avg_state is None:
            self.avg_state = copy.deepcopy(net.state_dict())
            return
        for k, v in net.state_dict().items():
            a = self.avg_state[k]
            if a.is_floating_point():
                a.add_(v.detach() - a, alpha=1.0 / self.avg_count)
            else:
                a.copy_(v)


def save_checkpoint(
    path: Path, fingerprint: str, net: StagedNet, opt: torch.optim.Optimizer, state: RunState
) -> None:
    """Write the checkpoint via a temp file + rename (a kill never leaves half a file)."""
    ck = {
        "fingerprint": fingerprint,
        "stage": state.stage,
        "next_epoch": state.next_epoch,
        "stage_done": state.stage_done,
        "net": net.state_dict(),
        "opt": opt.state_dict(),
        "best_state": state.best_state,
        "best_acc": state.best[0],
        "best_neg_loss": state.best[1],
        "history": state.history,
        "avg_state": state.avg_state,
        "avg_count": state.avg_count,
        "average": state.average,
        "probe_correct": state.probe_correct,
        "beat_by": state.beat_by,
        "from_probe": state.from_probe,
        "rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(ck, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it belongs to this run configuration, else None."""
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if ck.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is for another run configuration: starting fresh", path)
        return None
    return ck


def restore(net: StagedNet, ck: dict[str, Any]) -> RunState:
    """Load a checkpoint's weights and global RNG into the run; its progress as a RunState."""
    net.load_state_dict(ck["net"])
    torch.set_rng_state(ck["rng"])
    return RunState(
        best_state=ck["best_state"],
        history=list(ck["history"]),
        best=(ck["best_acc"], ck["best_neg_loss"]),
        stage=ck["stage"],
        next_epoch=ck["next_epoch"],
        stage_done=ck["stage_done"],
        avg_state=ck.get("avg_state"),
        avg_count=ck.get("avg_count", 0),
        average=ck.get("average"),
        probe_correct=ck.get("probe_correct"),
        beat_by=ck.get("beat_by", 0.0),
        from_probe=ck.get("from_probe", False),
    )
