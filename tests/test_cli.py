"""The command line end to end on a tiny local teacher, and its errors."""

from __future__ import annotations

import json

import torch
import yaml
from transformers import AutoModelForCausalLM

from echoatt.cli import main


def test_run_writes_analysis_and_student(trained_teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["run", "--teacher", str(trained_teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
            "--out", str(out)]
    budget = ["--num-sequences", "4", "--steps", "8", "--batch-size", "2", "--grad-accum", "1", "--eval-windows", "4",
              "--lr", "3e-4", "--warmup-steps", "2", "--tasks", ""]
    assert main(args + budget) == 0
    printed = capsys.readouterr().out
    assert "parameters: teacher" in printed and "suggested plan" in printed and "student before KD" in printed
    ppl = json.loads((out / "summary.json").read_text())["perplexity"]  # held-out text, never trained on
    assert ppl["teacher"] < ppl["student_before_kd"], ppl  # sharing cost something (a trained teacher)...
    assert ppl["student_after_kd"] < ppl["student_before_kd"], ppl  # ...and distillation won part of it back
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Attend", "## Copy", "## Adjust", "## Evaluation"):
        assert section in report
    assert (out / "training_curves.png").is_file() and "<table>" in (out / "report.html").read_text()
    assert AutoModelForCausalLM.from_pretrained(out / "student-distilled").config.followers() == [2, 4]
    sim = json.loads((out / "similarity.json").read_text())
    assert len(sim["head_avg"]) == 6 and sim["tokens"] == 4 * 32
    assert (out / "attention_similarity.png").is_file()
    assert yaml.safe_load((out / "run.yaml").read_text())["plan"] == "k=2"
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.followers() == [2, 4]
    info = json.loads((out / "student" / "sharing.json").read_text())
    assert info["plan"] == [[1, 2], [3, 4]] and info["parameters"]["removed"] > 0
    out_ids = student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 7)


def test_share_reads_config_file_and_matches_heads(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "share"
    cfg = tmp_path / "share.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": str(teacher_dir), "corpus": str(corpus_dir), "seq_len": 32, "plan": "1-3"}))
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
    assert main(["share", *common, "--method", "lisa", "--plan", "1-3"]) == 0
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
                 "--eval-windows", "2", "--tasks", ""]) == 0
    saved = json.loads((out / "compare.json").read_text())
    results, labels = saved["results"], saved["labels"]  # keyed by what each model is, shown by its label
    assert [labels[k] for k in results] == ["teacher", "attention drop (before KD)", "attention drop (after KD)",
                                            "LiSA (before KD)", "LiSA (after KD)"]
    share = {m: results[f"{m}/distilled"]["trained parameters"]["percent"] for m in ("drop", "lisa")}
    assert 0 < share["lisa"] < 5 < share["drop"]
    assert "| trained parameters | percent |" in (out / "compare.md").read_text()
