"""One function per command: each takes its config, writes into `config.out`, and returns what it made."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from echoatt.analysis import Similarity, attention_similarity
from echoatt.config import (
    AnalyzeConfig,
    BenchConfig,
    CommonConfig,
    CompareConfig,
    EvalConfig,
    ReportConfig,
    RunConfig,
    ShareConfig,
)
from echoatt.corpus import spread, token_windows
from echoatt.checkpoints import checkpoint_identities
from echoatt.distill import distill
from echoatt.metrics import perplexity
from echoatt.modeling import EchoAttForCausalLM
from echoatt.plan import SharingPlan
from echoatt.report import write_report
from echoatt.rundir import (
    RunDir,
    RunDirError,
    describe,
    device_of,
    identity_of,
    read_student_config,
    record,
    same_student,
    setup,
    student_identity,
)
from echoatt.student import build_student, head_maps, kv_cache_bytes_per_token, parameter_report, save_student
from echoatt.teacher import Teacher, load_teacher

def analyze(config: AnalyzeConfig, teacher: Teacher | None = None) -> Similarity:
    """Measure the teacher's layer x layer attention similarity; write similarity.json and a heatmap."""
    config.validate()
    setup(config)
    teacher = teacher or load_teacher(config.teacher, device=device_of(config))
    tokenizer = teacher.text_tokenizer("the similarity analysis")
    train, _ = token_windows(tokenizer, config.corpus, config.seq_len, config.encoding)
    run = RunDir(record(config, "analyze"))
    windows = spread(train, config.num_sequences)
    settings = {"teacher": teacher.name, "corpus": config.corpus, "seq_len": config.seq_len, "sequences": len(windows)}
    similarity = attention_similarity(teacher.model, windows, settings=settings)
    similarity.save(run.similarity)
    similarity.heatmap(run.heatmap)
    suggested = SharingPlan.from_threshold(similarity.head_matched, config.threshold)
    print(similarity.summary())
    print(f"suggested plan (head-matched similarity >= {config.threshold}): {suggested.describe()}")
    print(f"wrote {run.similarity} and {run.heatmap}")
    return similarity


def analyze_with_defaults(config: CommonConfig, teacher: Teacher) -> Similarity:
    """`analyze` with another command's options: every analysis setting that command has (teacher, corpus, out,
    and num_sequences/threshold where it takes them), analyze's defaults for the rest."""
    shared = {f.name for f in dataclasses.fields(AnalyzeConfig)} & {f.name for f in dataclasses.fields(config)}
    return analyze(AnalyzeConfig(**{k: getattr(config, k) for k in shared}), teacher)


def find_similarity(config: ShareConfig) -> Similarity | None:
    path = Path(config.similarity) if config.similarity else RunDir(Path(config.out)).similarity
    if config.similarity and not path.is_file():
        raise FileNotFoundError(f"no similarity file at {path}")
    return Similarity.load(path) if path.is_file() else None


def claim_run_folder(run: RunDir, identity: dict, overwrite: bool) -> None:
    """Refuse to put a student into a folder that holds another one, or another one's checkpoints; with
    `overwrite`, clear them first. The same student again (a re-run) is welcome: its checkpoints stay."""
    held = []
    if run.student.exists():
        try:
            held.append(identity_of(run.student))
        except RunDirError:
            held.append(None)  # a damaged student is another student
    held += checkpoint_identities(run)
    others = [h for h in held if not same_student(h, identity)]
    if not others:
        return
    if not overwrite:
        what = describe(others[0]) if others[0] else "an unreadable or unlabelled student"
        raise RunDirError(f"{run.root} already holds another student ({what}) or its checkpoints; use another --out, "
                          "or --overwrite to clear them")
    print(f"--overwrite: clearing the previous student and its training in {run.root}")
    run.clear_student()


def share(
    config: ShareConfig, teacher: Teacher | None = None, similarity: Similarity | None = None
) -> EchoAttForCausalLM:
    """Build the student for `config.plan`, save it to OUT/student, and print the parameter savings."""
    config.validate()
    setup(config)
    run = RunDir(Path(config.out))
    teacher = teacher or load_teacher(config.teacher, device=device_of(config))
    tc = teacher.model.config
    layers = tc.num_hidden_layers
    SharingPlan.parse(config.plan, layers, np.zeros((layers, layers)))  # the plan's syntax, before any analysis
    similarity = similarity or find_similarity(config)
    mapped = config.method in ("copy", "lisa")
    needs_analysis = (mapped and config.head_map != "identity") or config.plan.startswith("threshold=")
    if similarity is None and needs_analysis:
        print("no similarity analysis found: measuring it first (echoatt analyze)")
        similarity = analyze_with_defaults(config, teacher)
    lisa = config.method == "lisa"
    plan = SharingPlan.parse(config.plan, layers, similarity.head_matched if similarity else None, adjacent=lisa)
    groups = tc.num_attention_heads // tc.num_key_value_heads
    maps = head_maps(plan, similarity, config.head_map, chain=lisa, kv_groups=groups) if mapped else None
    student = build_student(teacher.model, plan, maps, config.method, config.lisa_rank or None,
                            config.lisa_hidden or None)
    identity = student_identity(student.config, teacher.name)
    claim_run_folder(run, identity, config.overwrite)
    record(config, "share")
    params = parameter_report(teacher.model, student)
    kv = {
        "teacher": kv_cache_bytes_per_token(teacher.model.config),
        "student": kv_cache_bytes_per_token(student.config),
    }
    info = {
        "identity": identity,
        "plan": [list(b) for b in plan.blocks],
        "method": config.method,
        "head_map": config.head_map if mapped else None,
        "lisa": {"rank": student.config.lisa_rank, "hidden": student.config.lisa_hidden} if lisa else None,
        "parameters": params,
        "kv_cache_bytes_per_token_bf16": kv,
    }
    path = save_student(student, teacher.tokenizer, run.student, info)
    how = {"copy": f"head map: {config.head_map}", "drop": "attention dropped",
           "lisa": f"LiSA, rank {student.config.lisa_rank}, align hidden {student.config.lisa_hidden}, "
                   f"starting from head map: {config.head_map}"}[config.method]
    print(f"plan: {plan.describe()} ({how})")
    print(
        f"parameters: teacher {params['teacher']:,}  student {params['student']:,}  "
        f"removed {params['removed']:,} ({params['removed_percent']:.2f}%)"
    )
    print(f"KV cache per token (bf16): teacher {kv['teacher']:,} B  student {kv['student']:,} B")
    print(f"wrote the student to {path}")
    return student


def evaluate(config: EvalConfig, teacher: Teacher | None = None) -> dict:
    """Held-out perplexity and zero-shot accuracy (lm-eval) of the teacher and each model, side by side."""
    from transformers import AutoModelForCausalLM

    from echoatt.evaluate import check_tasks, save_results, zero_shot

    config.validate()
    setup(config)
    run = RunDir(Path(config.out))
    tasks = [t for t in config.tasks.split(",") if t]
    check_tasks(tasks)
    if config.models:
        paths = {Path(p).name: Path(p) for p in config.models.split(",") if p}
    else:
        named = {"student (before KD)": run.student, "student (after KD)": run.distilled}
        paths = {name: path for name, path in named.items() if (path / "config.json").is_file()}
    for name, path in paths.items():
        read_student_config(path, "model")
    teacher = teacher or load_teacher(config.teacher, device=device_of(config))
    tokenizer = teacher.text_tokenizer("evaluation")
    _, val = token_windows(tokenizer, config.corpus, config.seq_len, config.encoding)
    val = spread(val, config.eval_windows)
    out = record(config, "eval")
    results = {}
    for name, path in {"teacher": None, **paths}.items():
        model = teacher.model if path is None else AutoModelForCausalLM.from_pretrained(path).to(teacher.model.device)
        print(f"evaluating {name}")
        results[name] = {"held-out text": {"perplexity": perplexity(model.eval(), val)}}
        if tasks:
            results[name].update(zero_shot(model, tokenizer, tasks, config.limit or None, config.eval_batch_size))
    save_results(results, out)
    print((out / "eval.md").read_text())
    return results


def bench(config: BenchConfig) -> dict:
    """Speed and size, teacher vs student, in one process: a trained pair from OUT, or an architecture (--arch)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from echoatt.bench import arch_config, markdown, run_bench, save

    config.validate()
    setup(config)
    device = torch.device(device_of(config))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if config.arch:
        arch = arch_config(config.arch)
        plan = SharingPlan.parse(config.plan, arch.num_hidden_layers)
        print(f"building the {config.arch} architecture with random weights")
        teacher = LlamaForCausalLM(arch).to(dtype)
        heads = list(reversed(range(arch.num_attention_heads)))  # a non-identity map, as a matched student has
        maps = [heads if i in plan.followers else None for i in range(arch.num_hidden_layers)]
        student = build_student(teacher, plan, maps, config.method)
        name = f"bench-{Path(config.arch).stem}" + ("" if config.method == "copy" else f"-{config.method}")
    else:
        path = Path(config.student) if config.student else RunDir(Path(config.out)).student
        read_student_config(path)
        teacher = load_teacher(config.teacher).model
        student = AutoModelForCausalLM.from_pretrained(path)
        name = "bench"
    out = record(config, "bench")
    for model in (teacher, student):
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    print(f"plan: {len(student.config.followers())} of {student.config.num_hidden_layers} layers follow "
          f"({student.config.follower_type}); "
          f"{device}, {dtype}, {torch.get_num_threads()} threads")
    result = run_bench(teacher, student, config, device)
    save(result, out, name)
    print(markdown(result))
    return result


def compare(config: CompareConfig) -> dict:
    """The table users pick a method from: teacher, attention drop, plain copy, head-matched copy and LiSA at the
    same layers, each before and after the same distillation budget. Each method works in OUT/<method>/."""
    from echoatt.evaluate import save_results

    config.validate()
    setup(config)
    students = {  # name -> (label, --method, --head-map)
        "drop": ("attention drop", "drop", "identity"),
        "identity": ("plain copy", "copy", "identity"),
        "matched": ("head-matched copy", "copy", "matched"),
        "grouped": ("head-matched copy within KV groups", "copy", "grouped"),
        "lisa": ("LiSA", "lisa", "matched"),
    }
    methods = [m for m in config.methods.split(",") if m]
    unknown = set(methods) - set(students)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: use {', '.join(students)}")
    teacher = load_teacher(config.teacher, device=device_of(config))
    out = record(config, "compare")
    similarity = find_similarity(config)
    if similarity is None and any(students[m][2] != "identity" for m in methods):  # analysed once, for all
        similarity = analyze_with_defaults(config, teacher)
    results: dict = {}
    for method in methods:
        label, how, head_map = students[method]
        sub = dataclasses.replace(config, out=str(out / method), method=how, head_map=head_map)
        print(f"== {label} ==")
        share(sub, teacher, similarity)
        trained = distill(sub, teacher)["parameters"]
        scored = evaluate(dataclasses.replace(sub, models=""), teacher)
        results.setdefault("teacher", scored["teacher"])
        results[f"{label} (before KD)"] = scored["student (before KD)"]
        share_trained = {"trained parameters": {"percent": trained["percent"]}}
        results[f"{label} (after KD)"] = {**scored["student (after KD)"], **share_trained}
        save_results(results, out, "compare")
    print((out / "compare.md").read_text())
    return results


def run(config: RunConfig) -> dict:
    """The main job on one teacher: analyze -> share -> distill -> evaluate (perplexity and zero-shot)."""
    from echoatt.evaluate import check_tasks

    config.validate()
    setup(config)
    check_tasks([t for t in config.tasks.split(",") if t])  # before the long work, not after it
    teacher = load_teacher(config.teacher, device=device_of(config))
    similarity = analyze(config, teacher)
    out = record(config, "run")
    share(config, teacher, similarity)
    distill(config, teacher)
    results = evaluate(config, teacher)
    ppl = {name: r["held-out text"]["perplexity"] for name, r in results.items()}
    t, before, after = ppl["teacher"], ppl["student (before KD)"], ppl["student (after KD)"]
    summary = {
        "validation_windows": config.eval_windows,
        "seq_len": config.seq_len,
        "perplexity": {"teacher": t, "student_before_kd": before, "student_after_kd": after},
        "gap_closed_percent": 100.0 * (before - after) / (before - t) if before > t else None,
    }
    RunDir(out).summary.write_text(json.dumps(summary, indent=2))
    write_report(out)
    print(f"validation perplexity ({config.eval_windows} windows of {config.seq_len} tokens): teacher {t:.2f}, "
          f"student before KD {before:.2f}, after KD {after:.2f}")
    if summary["gap_closed_percent"] is not None:
        print(f"distillation closed {summary['gap_closed_percent']:.1f}% of the gap to the teacher")
    print(f"report: {out / 'report.html'}")
    return summary


def report(config: ReportConfig) -> None:
    md, page = write_report(config.run)
    print(f"wrote {md} and {page}")
