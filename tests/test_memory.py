"""glibc's thresholds for tensors: freed activations are reused, not mapped anew each step."""

import subprocess
import sys

import pytest

CHURN = """
import resource, sys, torch
from transferops.runtime.memory import tensor_sized_malloc
if sys.argv[1] == "tuned":
    assert tensor_sized_malloc()
def step():
    acts = [torch.ones(2 << 20) for _ in range(8)]  # a step's activations: 8 x 8 MiB at once
    del acts
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_are_reused_not_faulted_in_again():
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    default, tuned = faults("default"), faults("tuned")
    assert default > 100_000  # glibc trims the freed 64 MiB and faults it back in, every step
    assert tuned < default / 20
