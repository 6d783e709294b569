"""The main job (`echoatt run`): analyze, share, distill, evaluate before and after, a short speed check, the
report."""

from __future__ import annotations

from echoatt.commands.analyze import analyze
from echoatt.commands.bench import quick_speed
from echoatt.commands.evaluate import evaluate
from echoatt.commands.share import share
from echoatt.engines.vllm_serve import serving_text
from echoatt.evaluation.report import write_report
from echoatt.inputs.teacher import Teacher, load_teacher
from echoatt.run.config import (
    RunConfig,
    device_of,
    record,
    setup,
)
from echoatt.run.results import RunSummary, training_line
from echoatt.run.rundir import RunDir, read_student_config
from echoatt.training.distill import distill


def run(config: RunConfig, teacher: Teacher | None = None) -> RunSummary:
    """The main job on one teacher: analyze -> share -> distill -> evaluate (perplexity and zero-shot). `teacher`:
    one already loaded (`Teacher.of` a model object), else `config.teacher` is loaded."""
    from echoatt.evaluation.harness import check_tasks

    config.validate()
    setup(config)
    check_tasks([t for t in config.tasks.split(",") if t])  # before the long work, not after it
    teacher = teacher or load_teacher(config.teacher, device=device_of(config), context=config.seq_len)
    similarity = analyze(config, teacher, suggest=False)  # the run builds --plan, not a suggestion
    out = RunDir(record(config, "run"))
    share(config, teacher, similarity)
    trained = distill(config, teacher)
    results = evaluate(config, teacher)
    summary = RunSummary.of(results, config.eval_windows, config.seq_len)
    summary.training = trained["training"]
    summary.save(out)
    if config.speed:
        quick_speed(config, out.distilled, teacher)
    write_report(out.root)
    p = summary.perplexity
    print(f"validation perplexity ({config.eval_windows} windows of {config.seq_len} tokens): teacher "
          f"{p['teacher']:.2f}, student before KD {p['student_before_kd']:.2f}, after KD {p['student_after_kd']:.2f}")
    if summary.other_text:
        o = summary.other_text["perplexity"]
        print(f"{summary.other_text['text']} perplexity: teacher {o['teacher']:.2f}, student before KD "
              f"{o['student_before_kd']:.2f}, after KD {o['student_after_kd']:.2f} "
              f"({o['student_after_kd'] / o['teacher']:.2f}x the teacher's)")
    for line in summary.key_lines():
        print(line)
    if summary.gap_closed_percent is not None:
        print(f"distillation closed {summary.gap_closed_percent:.1f}% of the gap to the teacher")
    print(f"distillation {training_line(summary.training)}")
    print(f"report: {out.report[1]}")
    for line in serving_text(out.distilled, read_student_config(out.distilled)):
        print(line.replace("`", ""))
    return summary
