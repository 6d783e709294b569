"""The report: a page from whatever a run folder holds, written without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_report_reads_a_run_folder_without_torch(tmp_path):
    """`echoatt.report` and what it imports work where torch cannot be imported (the package's own __init__, which
    registers the model with transformers, is bypassed to show it)."""
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"validation_windows": 4, "seq_len": 32, "gap_closed_percent": 50.0,
                                                  "perplexity": {"teacher": 2.0, "student_before_kd": 4.0,
                                                                 "student_after_kd": 3.0}}))
    (run / "eval.md").write_text("| task | metric | teacher |\n|---|---|---|\n| piqa | acc | 0.6000 ± 0.0100 |\n")
    script = textwrap.dedent(f"""
        import sys, types
        sys.modules["torch"] = None  # any `import torch` now fails
        package = types.ModuleType("echoatt")
        package.__path__ = [{str(SRC / "echoatt")!r}]
        sys.modules["echoatt"] = package
        from echoatt.report import write_report
        md, page = write_report({str(run)!r})
        print(open(page).read())
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "<table>" in done.stdout and "<td>0.6000 ± 0.0100</td>" in done.stdout
    assert "<strong>50.0%</strong>" in done.stdout
    assert "## Evaluation" in (run / "report.md").read_text()
