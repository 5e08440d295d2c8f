"""The merger's memory, measured against what `warp-rlhf plan` estimates for it (warp_rlhf.plan.merger_estimate).

bench/merger_memory.py writes a random Llama and two perturbed policies tensor by tensor, then merges them in a
fresh process as a run's merger actor does (θ_init and the policies streamed from their directories, the results
written to disk, nothing held whole) and reports that process's resident set before and at the peak of the merge.
The README quotes it at 1.2B parameters; here, a 50M-parameter model keeps the test to seconds, with the
model-dependent terms well above the noise of a process's own allocations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_plan_bounds_the_merger_s_measured_memory() -> None:
    command = [sys.executable, "bench/merger_memory.py", "--params", "5e7", "--modes", "streamed", "--json"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    streamed, estimate = figures["streamed"], figures["estimate_gib"]
    model_part = sum(v for k, v in estimate.items() if k != "process") * (1 << 30)
    grown = streamed["peak_rss"] - streamed["rss_before"]
    # The estimate is an upper bound of what the merge adds (its buffers are sized for the largest tensor, which
    # most tensors do not fill), and not a loose one: it must not plan twice the memory the merge takes.
    assert grown <= model_part, (grown, estimate)
    assert grown >= 0.5 * model_part, (grown, estimate)
    assert streamed["peak_rss"] <= model_part + estimate["process"] * (1 << 30)  # the whole process, baseline too
