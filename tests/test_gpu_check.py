"""`scripts/gpu_check.sh` in its quick mode (tiny shapes, this CPU): every job runs and lands in the table, so the GPU
check cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # each job's figures in a file of its own, written as it ended; the lent machine returns eight files from OUT's top
    for name, *_ in JOBS:
        assert json.loads((tmp_path / "check" / f"{name}.json").read_text())["result"] == summary["jobs"][name]["result"]
    top = [p.name for p in (tmp_path / "check").iterdir() if p.is_file() and p.name != "tiny.json"]
    assert len(top) <= 8, top


def test_the_gpu_check_refuses_an_unknown_job(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "check"), "--quick", "--only", "tinylama-copy"])
    assert stop.value.code == 2
    assert "no job named tinylama-copy" in capsys.readouterr().err
