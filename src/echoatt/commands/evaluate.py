"""Score teacher and students (`echoatt eval`): perplexity on the validation split and on text of another
kind, each also on its key tokens (`key_tokens.py`: where the teacher needs the far context), the retrieval probe,
zero-shot accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from echoatt.common import is_model_folder
from echoatt.evaluation.key_tokens import text_keys, text_perplexities
from echoatt.evaluation.metrics import retrieval
from echoatt.inputs.corpus import other_windows, spread, token_windows
from echoatt.inputs.teacher import Teacher, load_teacher
from echoatt.run.config import (
    EvalConfig,
    device_of,
    record,
    setup,
)
from echoatt.run.results import MODEL_LABELS, other_row
from echoatt.run.rundir import RunDir, read_student_config

EVAL_PROBE = (8, 128)  # retrieval probe scored by `eval`: 8 windows of 128 random tokens, repeated


PROBE_ROW = "retrieval from context (repeated random tokens)"


def evaluate(config: EvalConfig, teacher: Teacher | None = None, known: dict[str, dict] | None = None) -> dict:
    """Held-out perplexity and zero-shot accuracy (lm-eval) of the teacher and each model, side by side. Results are
    keyed `teacher`, `student`, `distilled` (OUT's students) or by folder name (`--models`). `known`: zero-shot
    scores already taken of some of those models (compare: the trade curve's untrained students), not taken again."""
    from transformers import AutoModelForCausalLM

    from echoatt.evaluation.harness import cached_zero_shot, check_tasks, save_results, zero_shot

    config.validate()
    setup(config)
    run = RunDir(Path(config.out))
    tasks = [t for t in config.tasks.split(",") if t]
    check_tasks(tasks)
    if config.models:
        paths = model_names([Path(p) for p in config.models.split(",") if p])
    else:
        paths = {name: path for name, path in (("student", run.student), ("distilled", run.distilled))
                 if is_model_folder(path)}
    for path in paths.values():
        read_student_config(path, "model")
    teacher = teacher or load_teacher(config.teacher, device=device_of(config), context=config.seq_len)
    tokenizer = teacher.text_tokenizer("evaluation")
    texts = perplexity_texts(config, tokenizer)
    keys = text_keys(teacher.stamp(), teacher.model, texts)
    probe = teacher.retrieval_probe(*EVAL_PROBE, seed=config.seed)
    record(config, "eval")
    results = {}
    for name, path in {"teacher": None, **paths}.items():
        model = teacher.model if path is None else AutoModelForCausalLM.from_pretrained(path).to(teacher.model.device)
        print(f"evaluating {MODEL_LABELS.get(name, name)}")
        results[name] = text_perplexities(model.eval(), texts, keys)
        results[name][PROBE_ROW] = {"acc": retrieval(model, probe)["accuracy"]}
        if tasks and path is None:  # the frozen teacher: scored once per task and sample (cached)
            results[name].update(cached_zero_shot(model, tokenizer, tasks, config.limit or None,
                                                  config.eval_batch_size, teacher.stamp()))
        elif tasks:
            results[name].update((known or {}).get(name)
                                 or zero_shot(model, tokenizer, tasks, config.limit or None, config.eval_batch_size))
    print(save_results(results, run.results("eval"), MODEL_LABELS))
    return results


def perplexity_texts(config: EvalConfig, tokenizer) -> dict[str, torch.Tensor]:
    """The windows perplexity is scored on, by results row: the corpus' validation split ("held-out text") and, with
    --other-text, text of another kind (where the student's quality must generalise, not just fit the corpus)."""
    _, val = token_windows(tokenizer, config.corpus, config.seq_len, config.encoding)
    texts = {"held-out text": spread(val, config.eval_windows)}
    if config.other_text:
        texts[other_row(config.other_text)] = other_windows(tokenizer, config.other_text, config.seq_len, config.eval_windows,
                                                 config.encoding)
    return texts


def model_names(paths: list[Path]) -> dict[str, Path]:
    """A short, distinct name for each model folder: its own name, or with its parents' where names repeat
    (`a/student`, `b/student`)."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return dict(zip(names, paths, strict=True))
    raise ValueError(f"--models lists the same folder twice: {[str(p) for p in paths]}")
