"""Measure the teacher's attention similarity (`echoatt analyze`)."""

from __future__ import annotations

import dataclasses

from echoatt.inputs.corpus import spread, token_windows
from echoatt.inputs.teacher import Teacher, load_teacher
from echoatt.planning import planners
from echoatt.planning.analysis import Similarity, attention_redundancy, attention_similarity, induction_scores
from echoatt.run.config import (
    AnalyzeConfig,
    CommonConfig,
    device_of,
    record,
    setup,
)
from echoatt.run.rundir import RunDir


def analyze(config: AnalyzeConfig, teacher: Teacher | None = None, suggest: bool = True) -> Similarity:
    """Measure the teacher's layer x layer attention similarity; write similarity.json and a heatmap. `suggest`:
    print the threshold plan the analysis suggests (only where the command is `analyze` itself: `run` and `share`
    build the plan they were given)."""
    config.validate()
    setup(config)
    teacher = teacher or load_teacher(config.teacher, device=device_of(config), context=config.seq_len)
    tokenizer = teacher.text_tokenizer("the similarity analysis")
    train, _ = token_windows(tokenizer, config.corpus, config.seq_len, config.encoding)
    run = RunDir(record(config, "analyze"))
    windows = spread(train, config.num_sequences)
    settings = {"teacher": teacher.name, "corpus": config.corpus, "seq_len": config.seq_len, "sequences": len(windows)}
    similarity = attention_similarity(teacher.model, windows, settings=settings)
    similarity.induction = induction_scores(teacher.model, teacher.retrieval_probe())
    similarity.redundancy = attention_redundancy(teacher.model, windows[:4])
    similarity.save(run.similarity)
    similarity.heatmap(run.heatmap)
    print(similarity.summary())
    if suggest:
        suggested = planners.from_threshold(similarity.head_matched, config.threshold)
        print(f"suggested plan (head-matched similarity >= {config.threshold}): {suggested.describe()}")
    print(f"wrote {run.similarity} and {run.heatmap}")
    return similarity


def analyze_with_defaults(config: CommonConfig, teacher: Teacher) -> Similarity:
    """`analyze` with another command's options: every analysis setting that command has (teacher, corpus, out,
    and num_sequences/threshold where it takes them), analyze's defaults for the rest."""
    shared = {f.name for f in dataclasses.fields(AnalyzeConfig)} & {f.name for f in dataclasses.fields(config)}
    return analyze(AnalyzeConfig(**{k: getattr(config, k) for k in shared}), teacher, suggest=False)
