"""`scripts/gpu_check.sh` in its quick mode (tiny shapes, this CPU): every job runs and lands in the table, so the GPU
check cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_job_in_quick_mode(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import JOBS

    env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "check")], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert summary["quick"] and set(summary["jobs"]) == {name for name, *_ in JOBS}
    table = (tmp_path / "check" / "gpu_check.md").read_text()
    for name, *_ in JOBS:
        assert f"| {name} | decode |" in table, name
    compiled = summary["jobs"]["tinyllama-copy-compiled"]["result"]["figures"][0]
    assert compiled["setting"]["compiled"] and compiled["setting"]["cache"] == "static"
    distill = next(f for f in summary["jobs"]["tinyllama-copy"]["result"]["figures"] if f["figure"] == "distill_step")
    assert distill["kd_output_bytes_per_token_vocab_entry"] > 0
