"""The command line end to end on a tiny local teacher, and its errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from conftest import TOY
from transformers import AutoConfig, AutoModelForCausalLM

from echoatt.building.student import StudentSpec, plan_bounds, student_config
from echoatt.cli import main
from echoatt.planning import planners
from echoatt.planning.analysis import Similarity
from echoatt.planning.plan import SharingPlan
from echoatt.run.results import TradeCurve


def test_run_writes_analysis_and_student(trained_teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["run", "--teacher", str(trained_teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
            "--out", str(out), *TOY]
    budget = ["--num-sequences", "4", "--steps", "8", "--batch-size", "2", "--grad-accum", "1", "--eval-windows", "4",
              "--lr", "3e-4", "--warmup-steps", "2", "--tasks", ""]
    assert main(args + budget) == 0
    printed = capsys.readouterr().out
    assert "parameters: teacher" in printed and "student before KD" in printed
    assert "suggested plan" not in printed  # the run builds --plan: it does not suggest another one
    ppl = json.loads((out / "summary.json").read_text())["perplexity"]  # held-out text, never trained on
    assert ppl["teacher"] < ppl["student_before_kd"], ppl  # sharing cost something (a trained teacher)...
    assert ppl["student_after_kd"] < ppl["student_before_kd"], ppl  # ...and distillation won part of it back
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Attend", "## Copy", "## Adjust", "## Evaluation", "## Speed and size"):
        assert section in report
    other = json.loads((out / "summary.json").read_text())["other_text"]  # Wikipedia, where quality must generalise
    assert other["text"] == "other text (wikipedia)" and set(other["perplexity"]) == set(ppl)
    assert "Text of another kind (wikipedia): teacher" in report and "other text (wikipedia) perplexity" in printed
    assert "| retrieval from context (repeated random tokens) | acc |" in report
    assert "The student was trained in fp32 (" in report and "distillation trained in fp32 (" in printed
    assert json.loads((out / "summary.json").read_text())["training"]["precision"]["name"] == "fp32"
    speed = json.loads((out / "bench.json").read_text())  # the short measured speed, beside its bounds
    assert [f["figure"] for f in speed["figures"]] == ["prefill", "decode"]
    assert all(f["ratios"]["headline"]["bound"] > 0 for f in speed["figures"])
    assert (out / "training_curves.png").is_file() and "<table>" in (out / "report.html").read_text()
    info = json.loads((out / "student" / "sharing.json").read_text())
    plan = SharingPlan.read(info["plan"], 6)  # the plan is kept as its spec
    changed = sorted(plan.followers + list(plan.dropped))  # shared or dropped
    assert changed and info["parameters"]["removed"] > 0
    config = AutoConfig.from_pretrained(trained_teacher_dir)
    k2_plan = planners.from_k(6, 2)  # blind k=2, with the head maps the analysis gives it
    maps = StudentSpec().head_maps(config, k2_plan, Similarity.load(out / "similarity.json"))
    k2 = plan_bounds(config, student_config(config, k2_plan, maps))
    assert info["bounds"]["decode"] >= 1.15 - 1e-9  # the default budget's target...
    effects = json.loads((out / "block_effects.json").read_text())["blocks"]
    cost = lambda names: sum(sum(effects[n].values()) for n in names)
    chosen = [change.name for change in plan.changes()]
    assert set(chosen) <= set(effects)  # ...met by measured candidates...
    assert k2["decode"] < 1.15 or cost(chosen) <= cost(["1-2", "3-4"])  # ...at no more loss than k=2 where k=2 meets it
    distilled = AutoModelForCausalLM.from_pretrained(out / "student-distilled").config
    assert distilled.attention_changed() == changed and distilled.followers() == sorted(
        plan.followers)  # followers are those that follow: not the dropped layers
    sim = json.loads((out / "similarity.json").read_text())
    assert len(sim["head_avg"]) == 6 and sim["tokens"] == 4 * 32
    assert (out / "attention_similarity.png").is_file()
    assert yaml.safe_load((out / "run.yaml").read_text())["plan"] == "budget=decode=1.15,drop"
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.attention_changed() == changed
    out_ids = student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 7)


def test_share_reads_config_file_and_matches_heads(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "share"
    cfg = tmp_path / "share.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": str(teacher_dir), "corpus": str(corpus_dir), "seq_len": 32, "plan": "1-3",
                                   "allow_slower": True}))
    assert main(["share", "--config", str(cfg), "--out", str(out)]) == 0  # analyses first: no similarity.json yet
    sim = json.loads((out / "similarity.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    best = [max(range(4), key=lambda g: sim["head_head"][2][h][1][g]) for h in range(4)]
    assert student.config.head_map[2] == best
    assert student.config.attention_source == [0, 1, 1, 1, 4, 5]


def test_errors_are_messages_not_tracebacks(teacher_dir, tmp_path, capsys):
    assert main(["share", "--teacher", str(teacher_dir), "--plan", "2-2", "--head-map", "identity",
                 "--out", str(tmp_path)]) == 2
    assert "one layer" in capsys.readouterr().err
    assert main(["analyze", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "is neither a folder nor a hub id" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("platn: k=2\n")
    assert main(["share", "--config", str(bad)]) == 2
    assert "unknown options" in capsys.readouterr().err


def test_lisa_share_and_distill_train_only_lisa_parts(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lisa"
    common = ["--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32", "--out", str(out)]
    assert main(["share", *common, "--method", "lisa", "--plan", "1-3", *TOY]) == 0
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.follower_type == "lisa" and student.config.attention_source == [0, 1, 1, 2, 4, 5]
    sim = json.loads((out / "similarity.json").read_text())  # follower 3 starts aligned to layer 2, its source
    assert student.config.head_map[3] == [max(range(4), key=lambda g: sim["head_head"][3][h][2][g]) for h in range(4)]
    capsys.readouterr()
    assert main(["distill", *common, "--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--eval-windows", "2",
                 "--lr", "1e-2"]) == 0
    assert "--trainable auto" in capsys.readouterr().out
    trained = AutoModelForCausalLM.from_pretrained(out / "student-distilled")
    before, after = student.state_dict(), trained.state_dict()
    for name in before:  # everything but LiSA's parts is frozen
        assert torch.equal(before[name], after[name]) or ".align." in name or ".lowrank." in name, name
    assert not torch.equal(before["model.layers.2.self_attn.align.mix"], after["model.layers.2.self_attn.align.mix"])


def test_compare_puts_methods_side_by_side_with_their_trained_share(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "compare"
    assert main(["compare", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
                 "--out", str(out), "--methods", "drop,lisa", "--steps", "1", "--batch-size", "1", "--grad-accum", "1",
                 "--eval-windows", "2", "--tasks", "", "--plan", "budget=k=2,drop"]) == 0
    saved = json.loads((out / "compare.json").read_text())
    results, labels = saved["results"], saved["labels"]  # keyed by what each model is, shown by its label
    assert [labels[k] for k in results] == ["teacher", "attention drop (before KD)", "attention drop (after KD)",
                                            "LiSA (before KD)", "LiSA (after KD)"]
    share = {m: results[f"{m}/distilled"]["trained parameters"]["percent"] for m in ("drop", "lisa")}
    assert 0 < share["lisa"] < 5 < share["drop"]
    assert "| trained parameters | percent |" in (out / "compare.md").read_text()
    plans = {m: yaml.safe_load((out / m / "share.yaml").read_text())["plan"] for m in ("drop", "lisa")}
    assert plans["drop"] == plans["lisa"]  # the budget resolved once, to an explicit plan every method reads
    plan = planners.parse(plans["lisa"], 6)
    for m in ("drop", "lisa"):
        assert AutoConfig.from_pretrained(out / m / "student").attention_changed() == sorted(plan.followers + list(plan.dropped))


def test_compare_at_equal_bound_draws_the_trade_curve(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    """Each method gets its own plan per predicted bound (drop by LLM-Drop's criterion), every point is scored before
    training (zero-shot too: lm-eval stands in here by a score that counts the model's changed layers; perplexity on
    the validation split and on text of another kind), every point is distilled (--distill-points all); the report
    shows the curve."""
    import echoatt.evaluation.harness

    def score(model, tokenizer, tasks, limit, batch_size, *stamp):  # 20 items: the first 12 - changed right
        changed = len(model.config.attention_changed()) if hasattr(model.config, "attention_changed") else 0
        mark = 1e-4 * (sum(float(p.double().sum()) for p in model.parameters()) % 1)  # which weights were scored
        return {t: {"acc": 0.6 - 0.05 * changed + mark, "acc_stderr": 0.03, "samples": limit,
                    "items": [float(i < 12 - changed) for i in range(20)]} for t in tasks}

    students_scored = []
    monkeypatch.setattr(echoatt.evaluation.harness, "zero_shot", lambda *a: students_scored.append(1) or score(*a))
    monkeypatch.setattr(echoatt.evaluation.harness, "cached_zero_shot", score)
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out, other = tmp_path / "compare", tmp_path / "other.txt"
    other.write_text("Numbers and symbols of another kind: 3 + 4 = 7; x * y; [a, b]; {c: d}. " * 60)
    assert main(["compare", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
                 "--out", str(out), "--methods", "drop,matched,lisa,mixed,drop-only", "--steps", "1",
                 "--batch-size", "1", "--other-text", str(other), "--distill-points", "all",
                 "--grad-accum", "1", "--eval-windows", "2", "--tasks", "boolq,piqa", "--limit", "5",
                 "--equal-bound", "prefill=1.01,1.02", "--calibrate", "4"]) == 0
    curve = json.loads((out / "trade_curve.json").read_text())
    # 4 methods reach both values (8 points), then each distilled student (8); the untrained students are the
    # curve's own (same plan, same calibration) and are not scored again
    assert len(students_scored) == 4 * 2 + 4 * 2
    results = json.loads((out / "compare.json").read_text())["results"]
    for name, label in (("drop", "attention drop"), ("matched", "head-matched copy"),
                        ("mixed", "shared and dropped (mixed)")):  # each method's own first point, to the weights
        assert results[f"{name}/student"]["piqa"]["acc"] == curve["points"][label][0]["zero_shot"]["piqa"]
    assert results["drop/student"]["piqa"]["acc"] != results["matched/student"]["piqa"]["acc"]  # told apart
    assert curve["metric"] == "prefill" and set(curve["points"]) == {
        "attention drop", "head-matched copy", "shared and dropped (mixed)",
        "dropped by measured loss (llama.cpp-servable)"}
    servable = AutoConfig.from_pretrained(out / "drop-only" / "student")  # no layer reads another's attention
    assert {servable.role(i) for i in range(servable.num_hidden_layers)} == {"ordinary", "dropped"}
    assert set(curve["unreachable"]["LiSA"]) == {"1.01", "1.02"}  # LiSA is slower than the teacher at prefill
    assert "LiSA" not in curve["trained"] and not (out / "lisa" / "student").exists()
    sim = json.loads((out / "similarity.json").read_text())
    for label, points in curve["points"].items():
        assert [p["target"] for p in points] == [1.01, 1.02]
        assert all(p["bounds"]["prefill"] >= p["target"] for p in points)
        assert points[0]["followers"] <= points[1]["followers"]
        trained = curve["trained"][label]
        assert [t["target"] for t in trained] == [1.01, 1.02]  # every value distilled, each at the curve's plan
        assert [t["bounds"] for t in trained] == [p["bounds"] for p in points]
        assert all(t["other_perplexity"] > 1 and t["perplexity"] > 1 for t in trained)
        measured = trained[0]["measured"]  # its short measured speed, beside the bound at that setting
        folder = {"attention drop": "drop", "head-matched copy": "matched", "shared and dropped (mixed)": "mixed",
                  "dropped by measured loss (llama.cpp-servable)": "drop-only"}[label]
        timed = {f["figure"]: f["ratios"]["headline"]
                 for f in json.loads((out / folder / "bench.json").read_text())["figures"]}
        assert measured == {k: {"setting": measured[k]["setting"], "ratio": timed[k]["ratio"], "bound": timed[k]["bound"]}
                            for k in ("prefill", "decode")}  # the ratio and bound its own timing wrote
        for p in points:  # each point scored on the tasks, as itself
            assert p["tasks"] == 2 and p["zero_shot_mean"] == pytest.approx(0.6 - 0.05 * p["followers"], abs=1e-4)
            assert p["zero_shot_stderr"] == pytest.approx(0.03 / 2**0.5)
            assert p["zero_shot_gap"] == pytest.approx(-0.05 * p["followers"])  # paired with the teacher's items
            assert p["other_perplexity"] > 1 and p["other_perplexity"] != p["perplexity"]
        assert trained[1]["zero_shot_gap"] == pytest.approx(-0.05 * points[1]["followers"])
    assert curve["teacher"]["zero_shot_mean"] == pytest.approx(0.6, abs=1e-4)
    dropped = SharingPlan.read(curve["points"]["attention drop"][0]["spec"], 6)
    ranked = sorted(range(2, 5), key=lambda i: -sim["redundancy"][i])
    assert not dropped.blocks and sorted(dropped.dropped) == sorted(ranked[: len(dropped.dropped)])  # most redundant first
    assert (out / "matched" / "block_effects.json").is_file() and not (out / "drop" / "block_effects.json").exists()
    mixed = json.loads((out / "mixed" / "block_effects.json").read_text())["blocks"]
    assert {"drop=2", "drop=3", "drop=4"} <= set(mixed)  # dropping each layer alone was measured beside the blocks
    report = (out / "report.md").read_text()  # compare writes its report
    assert "## The trade: quality against speed" in report and (out / "trade_curve.png").is_file()
    assert (out / "mixed-prefill1.02" / "student-distilled").is_dir()  # beyond the first value: beside it
    assert (out / "mixed-prefill1.02" / "block_effects.json").read_text() == (out / "mixed" / "block_effects.json").read_text()
    assert "| mixed-prefill1.02/distilled" not in report and "at prefill 1.02 (after KD)" in report
    teacher_other = curve["teacher"]["other_perplexity"]
    assert f"{curve['points']['attention drop'][0]['other_perplexity']:.2f} (" in report and teacher_other > 1
    assert "zero-shot mean over 2 tasks" in report and "| teacher | | 0 | 1 | 1 | 1 |" in report
    followers = curve["points"]["attention drop"][0]["followers"]
    assert f"({-5 * followers:+.1f} ± " in report  # the paired gap in points beside each zero-shot mean
    assert "against the teacher only" in report  # not read as a comparison between methods
    assert "prefill >= 1.01" in "\n".join(TradeCurve.load(out / "trade_curve.json").lines())
    assert "measured (bound at that setting)" in report and "decode 8 × 256: " in report
    assert "LiSA cannot reach prefill 1.01, 1.02 at all" in report


def test_compare_where_no_method_reaches_the_bound_says_so(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "compare"
    assert main(["compare", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
                 "--out", str(out), "--methods", "lisa", "--eval-windows", "2", "--tasks", "",
                 "--equal-bound", "prefill=1.01"]) == 0
    assert "no student was distilled" in capsys.readouterr().out
    curve = json.loads((out / "trade_curve.json").read_text())
    assert list(curve["unreachable"]) == ["LiSA"] and curve["unreachable"]["LiSA"]["1.01"] < 1.01
    assert "LiSA cannot reach prefill 1.01 at all" in (out / "report.md").read_text()


def test_a_command_leaves_the_process_group_before_exit(tmp_path):
    """Under torchrun the group must be gone when the interpreter exits (a live gloo group can abort it)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        main(["report", str(tmp_path)])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_full_disk_is_a_message_not_a_traceback(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from echoatt.commands import share

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(share, "save_student", full)
    assert main(["share", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
                 "--out", str(tmp_path / "out"), "--plan", "k=2", "--calibrate", "0", *TOY]) == 1
    assert "error: the disk is full" in capsys.readouterr().err


def test_compare_with_a_budget_plan_analyses_even_when_no_method_maps_heads(teacher_dir, corpus_dir, tmp_path,
                                                                           monkeypatch):
    """Attention drop and the plain copy need no head maps, but the budget's block losses are measured on the
    head-matched copy: the analysis runs."""
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "compare"
    assert main(["compare", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
                 "--out", str(out), "--methods", "drop,identity", "--plan", "budget=prefill=1.01", "--steps", "1",
                 "--batch-size", "1", "--grad-accum", "1", "--eval-windows", "2", "--tasks", ""]) == 0
    assert (out / "similarity.json").is_file() and (out / "block_effects.json").is_file()


def test_densest_bound_is_each_methods_real_reach():
    """Attention drop (and a mixed plan) may drop every layer its budget allows (2 .. L-2), far more than two of every
    three: a KV target only dropping reaches is not called unreachable."""
    from conftest import tiny_teacher

    from echoatt.commands.compare import densest_bound

    config = tiny_teacher().config
    every = SharingPlan(6, ((1, 2, 3, 4),))  # layers 2, 3, 4 as followers of 1: dropped, that is all a budget may drop
    dropped = plan_bounds(config, student_config(config, every, method="drop"))["kv"]
    assert dropped == pytest.approx(3 / 6)
    assert densest_bound(StudentSpec(plan="budget=kv=0.55", method="drop"), config, None, "kv") == pytest.approx(dropped)
    mixed = StudentSpec(plan="budget=kv=0.55,drop", method="copy", head_map="identity")
    assert densest_bound(mixed, config, None, "kv") == pytest.approx(dropped)
    copy = StudentSpec(plan="budget=kv=0.55", method="copy", head_map="identity")
    blocks = plan_bounds(config, student_config(config, planners.from_k(6, 3)))["kv"]
    assert densest_bound(copy, config, None, "kv") == pytest.approx(blocks) and blocks > 0.55
    mixed_prefill = densest_bound(mixed, config, None, "prefill")
    wide = dataclasses.replace(mixed, plan="budget=prefill=9,drop,linear,ffn")  # from the planner's own candidates:
    assert densest_bound(wide, config, None, "prefill") > mixed_prefill  # its FFNs narrowed too (they were left out)


def test_a_kv_curve_says_at_most():
    curve = TradeCurve("kv", {"perplexity": 1.0, "retrieval": 1.0})
    curve.add("attention drop", {"target": 0.7, "followers": 2, "bounds": {"prefill": 1.1, "decode": 1.2, "kv": 0.66},
                                 "perplexity": 2.0, "retrieval": 0.5})
    assert curve.lines()[0].startswith("attention drop at kv <= 0.7:")


def test_help_and_version_load_no_model_code():
    """`echoatt COMMAND --help` and `--version` answer from the configs alone: transformers' model code (seconds to
    import) is loaded only when a command runs, which then registers the student's Auto classes."""
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['echoatt', 'share', '--help']\nfrom echoatt.cli import main\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint('MODEL CODE', 'transformers.modeling_utils' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--allow-slower" in done.stdout and "the student (plan, method, calibration):" in done.stdout
    assert "MODEL CODE False" in done.stdout
    version = subprocess.run([sys.executable, "-m", "echoatt.cli", "--version"], capture_output=True, text=True,
                             check=True)
    from echoatt.versions import VERSION

    assert version.stdout.strip() == f"echoatt {VERSION}"
