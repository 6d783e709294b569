"""The report: a page from whatever a run folder holds, written without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def test_report_reads_a_run_folder_without_torch(tmp_path):
    """`echoatt.evaluation.report` and what it imports work where torch cannot be imported (the package's own
    __init__, which registers the model with transformers, is bypassed to show it)."""
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
        from echoatt.evaluation.report import write_report
        md, page = write_report({str(run)!r})
        print(open(page).read())
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "<table>" in done.stdout and "<td>0.6000 ± 0.0100</td>" in done.stdout
    assert "<strong>50.0%</strong>" in done.stdout
    assert "## Evaluation" in (run / "report.md").read_text()


def test_the_report_places_a_default_teachers_student_on_the_measured_curve(tmp_path):
    """A student of the default teacher is shown among the measured plans (its bounds, its own scores); a student of
    another teacher is not (the curve says nothing about it)."""
    from echoatt.evaluation.report import MEASURED_CURVE, write_report
    from echoatt.run.rundir import SharingInfo

    curve = json.loads(MEASURED_CURVE.read_text())
    assert curve["points"] and sum(p.get("default", False) for p in curve["points"]) == 1
    for p in curve["points"]:  # every measured point: distilled, scored paired, with its other-text ratio
        assert {"method", "label", "bounds", "zero_shot_gap", "zero_shot_gap_stderr", "other_ratio", "lambada",
                "lambada_stderr"} <= set(p)
        assert set(p["measured_speed"]) == {"prefill", "decode"}  # each point timed, as `run` times its student
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    info = SharingInfo(identity={"teacher": f"/cache/teachers/{curve['teacher_file']}-123",
                                 "attention_source": list(range(30))}, plan="27-28,drop=5",
                       method="copy", head_map="matched", lisa=None,
                       parameters={"teacher": 10, "student": 9, "removed": 1, "removed_percent": 10.0},
                       kv_cache_bytes_per_token_bf16={"teacher": 10, "student": 8},
                       bounds={"prefill": 1.234, "decode": 1.456, "kv": 0.7})
    info.save(run / "student")
    (run / "summary.json").write_text(json.dumps({
        "validation_windows": 4, "seq_len": 32, "gap_closed_percent": 50.0,
        "perplexity": {"teacher": 2.0, "student_before_kd": 4.0, "student_after_kd": 3.0},
        "other_text": {"text": "other text (wikipedia)",
                       "perplexity": {"teacher": 20.0, "student_before_kd": 30.0, "student_after_kd": 23.0}}}))
    report = write_report(run)[0].read_text()
    assert "## Where this student sits on the trade curve" in report and (run / "trade_place.png").is_file()
    assert "| **this run's student** | 1.234× | 1.456× | – / – | – | 1.15× | – |" in report
    figures = [  # the run's own timing, and a setting the curve has not
        {"figure": f, "setting": setting, "ratios": {"headline": {"ratio": r}}}
        for f, setting, r in (("prefill", {"batch": 1, "tokens": 512}, 1.1), ("prefill", {"batch": 1, "tokens": 128}, 1.5),
                              ("decode", {"batch": 8, "context": 256, "steps": 8}, 1.3),
                              ("decode", {"batch": 8, "context": 512, "steps": 8}, 1.6))]
    (run / "bench.json").write_text(json.dumps({"device": "CPU (x86_64)", "figures": figures}))
    assert "| **this run's student** | 1.234× | 1.456× | 1.100× / 1.300× | – | 1.15× | – |" in write_report(run)[0].read_text()
    (run / "bench.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "figures": figures}))
    assert "| **this run's student** | 1.234× | 1.456× | – / – | – | 1.15× | – |" in write_report(run)[0].read_text()  # a
    # GPU's ratios are not put beside the curve's CPU-measured ones
    assert "(the default)" in report and "Text of another kind (wikipedia): teacher **20.00**" in report
    info.identity["teacher"] = "/models/Qwen3-0.6B"
    info.save(run / "student")
    assert "trade curve" not in write_report(run)[0].read_text()


def test_the_runs_own_zero_shot_mark_carries_its_error_bar():
    """The run's own zero-shot gap on the curve plot is drawn with ± 2 paired stderr of its own items (the default run
    scores 30 items a task: about ± 2 points), as the curve's points are, so it never looks better by noise."""
    from echoatt.evaluation.report import own_mark

    own = {"zero_shot_gap": 0.004, "zero_shot_gap_stderr": 0.011, "other_ratio": 1.1, "lambada": 0.3,
           "lambada_stderr": 0.08}
    assert own_mark(own, "zero_shot_gap", 100) == (pytest.approx(0.4), [pytest.approx(2.2)])
    assert own_mark(own, "other_ratio", 1) == (1.1, None)
    assert own_mark(own, "lambada", 1) == (0.3, [pytest.approx(0.16)])
