"""Students of several methods side by side (`echoatt compare`): at the same layers, or at the same
predicted speed (the trade curve)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from echoatt.building.calibrate import calibrate_student
from echoatt.building.student import (
    VARIANTS,
    StudentSpec,
    plan_bounds,
    student_config,
)
from echoatt.commands.analyze import analyze_with_defaults
from echoatt.commands.bench import quick_speed
from echoatt.commands.evaluate import EVAL_PROBE, evaluate, perplexity_texts
from echoatt.commands.share import calibration_settings, find_similarity, share, spec_of
from echoatt.evaluation.key_tokens import text_keys, text_perplexities
from echoatt.evaluation.metrics import retrieval
from echoatt.evaluation.report import write_report
from echoatt.inputs.teacher import Teacher, load_teacher
from echoatt.planning import planners
from echoatt.planning.analysis import Similarity
from echoatt.planning.plan import AT_MOST, PlanError
from echoatt.planning.search import plan_measures
from echoatt.run.config import CompareConfig, device_of, record, setup
from echoatt.run.results import TradeCurve, point_perplexities, zero_shot_summary
from echoatt.run.rundir import RunDir, SharingInfo
from echoatt.training.distill import distill


def compare(config: CompareConfig) -> dict:
    """The table users pick a method from: teacher, attention drop, plain copy, head-matched copy and LiSA at the
    same layers — or, with `--equal-bound`, each at its own plan of the same predicted speed (and the trade curve
    over several speeds) — each before and after the same distillation budget. Each variant works in OUT/<variant>/."""
    from echoatt.evaluation.harness import save_results

    config.validate()
    setup(config)
    names = [m for m in config.methods.split(",") if m]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: use {', '.join(VARIANTS)}")
    teacher = load_teacher(config.teacher, device=device_of(config), context=config.seq_len)
    run = RunDir(record(config, "compare"))
    similarity = find_similarity(config)
    needs = config.equal_bound or config.plan.strip().startswith(("budget=", "threshold="))  # plans chosen by it
    if similarity is None and (needs or any(VARIANTS[n].head_map != "identity" for n in names)):
        similarity = analyze_with_defaults(config, teacher)  # analysed once, for all
    subs = {name: dataclasses.replace(config, out=str(run.root / name), method=VARIANTS[name].method,
                                      head_map=VARIANTS[name].head_map, allow_slower=True)  # compared, not chosen
            for name in names}
    if config.equal_bound:
        curve, untrained = trade_curve(subs, teacher, similarity, run)
        subs = curve_students(config, subs, curve)
    elif config.plan.strip().startswith("budget="):  # the same layers for every method: the head-matched copy's plan
        copy = dataclasses.replace(config, method="copy", head_map="matched")
        plan = spec_of(copy).sharing_plan(teacher.model.config, similarity,
                                          **plan_measures(copy, teacher, spec_of(copy), similarity, run))
        print(f"every method at the layers the budget chose for the head-matched copy: {plan.describe()}")
        subs = {name: dataclasses.replace(sub, plan=plan.spec()) for name, sub in subs.items()}
    if not config.equal_bound:
        subs = {name: (sub, None) for name, sub in subs.items()}
    results: dict = {}
    labels = {"teacher": "teacher"}
    table = "no student was distilled: none reaches the --equal-bound values asked for (the trade curve has the rest)"
    for key, (sub, target) in subs.items():
        name = key.split("@")[0]
        label = VARIANTS[name].label + (f" at {key.split('@')[1]}" if "@" in key else "")
        print(f"== {label} ==")
        share(sub, teacher, similarity)
        trained = distill(sub, teacher)["parameters"]
        info, known = SharingInfo.load(Path(sub.out) / "student"), {}
        if config.equal_bound:  # the curve scored this very student (same plan, same calibration) before training
            point = next(p for p in curve.points[VARIANTS[name].label] if p["target"] == target)
            if info.plan == point["spec"]:
                known = {"student": untrained[VARIANTS[name].label][target]}
        scored = evaluate(dataclasses.replace(sub, models=""), teacher, known)
        results.setdefault("teacher", scored["teacher"])
        results[f"{key}/student"] = scored["student"]
        results[f"{key}/distilled"] = {**scored["distilled"], "trained parameters": {"percent": trained["percent"]}}
        labels |= {f"{key}/student": f"{label} (before KD)", f"{key}/distilled": f"{label} (after KD)"}
        table = save_results(results, run.results("compare"), labels)
        if config.equal_bound:
            speed = quick_speed(sub, RunDir(Path(sub.out)).distilled, teacher) if config.speed else {}
            curve.distilled(VARIANTS[name].label, target, info.bounds, scored["distilled"], scored["teacher"], speed)
            curve.save(run.trade_curve)
    print(table)
    print(f"report: {write_report(run.root)[1]}")
    return results


def curve_students(config: CompareConfig, subs: dict[str, CompareConfig],
                   curve: TradeCurve) -> dict[str, tuple[CompareConfig, float]]:
    """The curve's students `compare` distils (--distill-points) and their target values, keyed by method (the first
    value, in OUT/<method>) or method@value (in OUT/<method>-<metric><value>, beside it, with the method's measured
    block effects copied in)."""
    import shutil

    metric, values = config.bound_targets()
    wanted = {"first": values[:1], "all": values, "none": []}[config.distill_points]
    out = {}
    for name, sub in subs.items():
        reached = {p["target"] for p in curve.points.get(VARIANTS[name].label, [])}
        for value in wanted:
            if value not in reached:
                print(f"== {VARIANTS[name].label}: no plan reaches {metric} {value}; not distilled ==")
                continue
            plan = f"budget={metric}={value}{VARIANTS[name].budget_options}"
            if value == values[0]:
                out[name] = (dataclasses.replace(sub, plan=plan), value)
                continue
            folder = Path(f"{sub.out}-{metric}{value}")
            effects = RunDir(Path(sub.out)).block_effects
            if effects.is_file() and not RunDir(folder).block_effects.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(effects, RunDir(folder).block_effects)
            out[f"{name}@{metric} {value}"] = (dataclasses.replace(sub, plan=plan, out=str(folder)), value)
    return out


def trade_curve(subs: dict[str, CompareConfig], teacher: Teacher, similarity: Similarity,
                run: RunDir) -> tuple[TradeCurve, dict[str, dict[float, dict]]]:
    """For each method and each `--equal-bound` value: its budget plan, calibrated as `share` would, scored before
    any training on the validation text and the other text (perplexity), the retrieval probe and the zero-shot tasks (`--tasks`,
    `--limit` items each). Written to OUT/trade_curve.json. Also returns, per method and value, the full zero-shot
    scores (`compare` distils those students and need not score them again)."""
    from echoatt.evaluation.harness import cached_zero_shot, zero_shot

    config = next(iter(subs.values()))
    metric, values = config.bound_targets()
    tokenizer = teacher.text_tokenizer("the trade curve")
    texts = perplexity_texts(config, tokenizer)
    keys = text_keys(teacher.stamp(), teacher.model, texts)
    probe = teacher.retrieval_probe(*EVAL_PROBE, seed=config.seed)
    tasks, limit = [t for t in config.tasks.split(",") if t], config.limit or None
    scored = cached_zero_shot(teacher.model, tokenizer, tasks, limit, config.eval_batch_size, teacher.stamp())
    untrained: dict[str, dict[float, dict]] = {}
    curve = TradeCurve(metric, curve_perplexities(teacher.model, texts, keys)
                       | {"retrieval": retrieval(teacher.model, probe)["accuracy"]} | zero_shot_summary(scored))
    for name, sub in subs.items():
        label = VARIANTS[name].label
        for value in values:
            point = dataclasses.replace(sub, plan=f"budget={metric}={value}{VARIANTS[name].budget_options}")
            spec = spec_of(point)
            most = densest_bound(spec, teacher.model.config, similarity, metric)
            if (most > value) if metric in AT_MOST else (most < value):
                curve.unreachable.setdefault(label, {})[str(value)] = most
                print(f"{label} cannot reach {metric} {value}: {most:.3f} at its densest plan")
                continue
            measures = plan_measures(point, teacher, spec, similarity, RunDir(Path(point.out)))
            try:
                student, plan = spec.build(teacher.model, similarity, **measures)
            except PlanError as err:
                print(f"{label} at {metric} {value}: {err}")
                continue
            calibration, windows = calibration_settings(point, teacher, student)
            if calibration:
                calibrate_student(student, teacher.model, windows, point.calibrate_ridge, progress=False)
            scores = zero_shot(student, tokenizer, tasks, limit, config.eval_batch_size) if tasks else {}
            untrained.setdefault(label, {})[value] = scores
            curve.add(label, {
                "target": value, "spec": plan.spec(), "followers": len(plan.followers) + len(plan.dropped)
                + len(plan.linear),
                "bounds": plan_bounds(teacher.model.config, student.config),
                **curve_perplexities(student, texts, keys), "retrieval": retrieval(student, probe)["accuracy"],
                **zero_shot_summary(scores, scored)})
            print(curve.lines()[-1])
            curve.save(run.trade_curve)
    curve.save(run.trade_curve)  # also where no method reached any value: what they reach is the answer then
    return curve, untrained


def curve_perplexities(model, texts: dict[str, torch.Tensor], keys: dict[str, torch.Tensor]) -> dict[str, float]:
    """A trade-curve point's perplexities (`results.point_perplexities`): on the validation split, on the other text,
    and on each one's key tokens."""
    return point_perplexities(text_perplexities(model, texts, keys))


def densest_bound(spec: StudentSpec, teacher_config, similarity: Similarity, metric: str) -> float:
    """The bound of a method's densest budget plans (`planners.densest`, from the planner's own candidates), about
    the most a budget can reach: the best of them."""
    plans = planners.densest(spec.plan.strip(), teacher_config.num_hidden_layers, teacher_config.intermediate_size,
                             drop=spec.method == "drop")
    bounds = [plan_bounds(teacher_config, student_config(
        teacher_config, plan, spec.head_maps(teacher_config, plan, similarity), spec.method, spec.lisa_rank or None,
        spec.lisa_hidden or None))[metric] for plan in plans]
    return min(bounds) if metric in AT_MOST else max(bounds)
