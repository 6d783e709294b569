"""One function per command: each takes its config, writes into `config.out`, and returns what it made."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from echoatt.analysis import Similarity, attention_redundancy, attention_similarity, induction_scores
from echoatt.calibrate import calibrate_followers
from echoatt.checkpoints import checkpoint_identities
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
from echoatt.corpus import other_windows, spread, token_windows
from echoatt.distill import distill
from echoatt.metrics import perplexity, retrieval
from echoatt.modeling import EchoAttForCausalLM, family_fields
from echoatt.plan import AT_MOST, PlanError, SharingPlan
from echoatt.report import write_report
from echoatt.rundir import (
    MODEL_LABELS,
    QUICK_SPEED,
    RunDir,
    RunDirError,
    RunSummary,
    SharingInfo,
    TradeCurve,
    describe,
    device_of,
    identity_of,
    is_model_folder,
    other_row,
    read_student_config,
    record,
    same_student,
    setup,
    student_identity,
    zero_shot_summary,
)
from echoatt.sensitivity import BlockEffects, measure_block_effects
from echoatt.serve import serving_text
from echoatt.student import (
    VARIANTS,
    StudentSpec,
    kv_cache_bytes_per_token,
    parameter_report,
    plan_bounds,
    save_student,
    student_config,
)
from echoatt.teacher import Teacher, load_teacher, resolve_source


def analyze(config: AnalyzeConfig, teacher: Teacher | None = None) -> Similarity:
    """Measure the teacher's layer x layer attention similarity; write similarity.json and a heatmap."""
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


def spec_of(config: ShareConfig) -> StudentSpec:
    return StudentSpec(**{f.name: getattr(config, f.name) for f in dataclasses.fields(StudentSpec)})


def share(
    config: ShareConfig, teacher: Teacher | None = None, similarity: Similarity | None = None
) -> EchoAttForCausalLM:
    """Build the student for `config.plan`, save it to OUT/student, and print the parameter savings."""
    config.validate()
    setup(config)
    run = RunDir(Path(config.out))
    teacher = teacher or load_teacher(config.teacher, device=device_of(config), context=config.seq_len)
    spec = spec_of(config)
    spec.check(teacher.model.config.num_hidden_layers)
    similarity = similarity or find_similarity(config)
    if similarity is None and teacher.tokenizer is None and spec.without_text() != spec:
        print(f"the teacher has no tokenizer: nothing to measure a budget plan with, so plan {spec.without_text().plan}")
        spec = spec.without_text()
    if similarity is None and spec.needs_analysis:
        print("no similarity analysis found: measuring it first (echoatt analyze)")
        similarity = analyze_with_defaults(config, teacher)
    effects = block_effects(config, teacher, spec, similarity, run)
    student, plan = spec.build(teacher.model, similarity, block_loss=effects.loss if effects else None)
    calibration, windows = calibration_settings(config, teacher, student)
    identity = student_identity(student.config, teacher.name, calibration)
    claim_run_folder(run, identity, config.overwrite)
    record(config, "share")
    if calibration:
        report = calibrate_followers(student, teacher.model, windows, config.calibrate_ridge)
        print(report.summary())
        calibration = calibration | report.means()
    info = SharingInfo(
        identity=identity,
        plan=[list(b) for b in plan.blocks],
        dropped=list(plan.dropped),
        method=spec.method,
        head_map=spec.head_map if spec.mapped else None,
        lisa=({"rank": student.config.lisa_rank, "hidden": student.config.lisa_hidden}
              if spec.method == "lisa" else None),
        parameters=parameter_report(teacher.model, student),
        kv_cache_bytes_per_token_bf16={"teacher": kv_cache_bytes_per_token(teacher.model.config),
                                       "student": kv_cache_bytes_per_token(student.config)},
        calibration=calibration,
        bounds=plan_bounds(teacher.model.config, student.config),
        family={"architectures": teacher.model.config.architectures, **family_fields(student.config)},
    )
    path = save_student(student, teacher.tokenizer, run.student, info)
    print_student(info, student.config)
    print(f"wrote the student to {path}")
    return student


EFFECT_TEXT_WINDOWS, EFFECT_PROBE = 1, (2, 128)  # what each candidate block is scored on: cheap, paired with the teacher


def block_effects(config: ShareConfig, teacher: Teacher, spec: StudentSpec, similarity: Similarity | None,
                  run: RunDir) -> BlockEffects | None:
    """For a budget plan, the measured loss of each candidate block (`sensitivity.py`), kept in the run folder
    beside the analysis and reused while teacher, method, head map and text stay the same; None for other plans or
    a teacher without tokenizer (the similarity then predicts the loss)."""
    if (not spec.plan.strip().startswith("budget=") or teacher.tokenizer is None
            or spec.drop_ranking(similarity) is not None):  # attention drop ranks by its own criterion
        return None
    candidates = SharingPlan.budget_candidates(spec.plan.strip(), teacher.model.config.num_hidden_layers)
    settings = block_effect_settings(config, teacher, spec, similarity)
    effects = BlockEffects.load(run.block_effects) or BlockEffects({}, {}, settings)
    known = effects.known(settings)
    missing = [b for b in candidates if b not in known]
    if missing:  # measure what is not known yet under these settings
        train, _ = token_windows(teacher.tokenizer, config.corpus, config.seq_len, config.encoding)
        probe = teacher.retrieval_probe(*EFFECT_PROBE, seed=config.seed)
        fresh = measure_block_effects(teacher.model, spec, similarity, missing, spread(train, EFFECT_TEXT_WINDOWS),
                                      probe, settings)
        effects = BlockEffects(fresh.teacher, known | fresh.blocks, settings)
        run.root.mkdir(parents=True, exist_ok=True)
        effects.save(run.block_effects)
    print(effects.summary())
    return effects


def block_effect_settings(config: ShareConfig, teacher: Teacher, spec: StudentSpec,
                          similarity: Similarity | None) -> dict:
    """What measured block effects depend on, the key they are kept under: the teacher's weights (its stamp), the
    method and head maps (the analysis they come from, by content), and the text (corpus, encoding, windows, seed)."""
    maps = similarity.fingerprint() if similarity is not None and spec.mapped and spec.head_map != "identity" else None
    return {"teacher": teacher.stamp(), "method": spec.method, "head_map": spec.head_map, "analysis": maps,
            "corpus": config.corpus, "encoding": config.encoding, "seq_len": config.seq_len, "seed": config.seed,
            "text_windows": EFFECT_TEXT_WINDOWS, "probe": list(EFFECT_PROBE)}


def calibration_settings(config: ShareConfig, teacher: Teacher, student) -> tuple[dict | None, torch.Tensor | None]:
    """What the refit of the followers will use (settings, and the training windows, read now so that a corpus that
    cannot be used is refused before the run folder is touched); None where there is nothing to refit or no text."""
    if not config.calibrate or not any(student.config.role(i) in ("copy", "lisa") for i in student.config.followers()):
        return None, None
    if teacher.tokenizer is None:
        print(f"the teacher has no tokenizer ({teacher.tokenizer_error}): the followers are not calibrated")
        return None, None
    train, _ = token_windows(teacher.tokenizer, config.corpus, config.seq_len, config.encoding)
    settings = {"windows": config.calibrate, "ridge": config.calibrate_ridge, "corpus": config.corpus,
                "seq_len": config.seq_len}
    return settings, spread(train, config.calibrate)


def print_student(info: SharingInfo, config) -> None:
    how = {"copy": f"head map: {info.head_map}", "drop": "attention dropped",
           "lisa": f"LiSA, rank {config.lisa_rank}, align hidden {config.lisa_hidden}, "
                   f"starting from head map: {info.head_map}"}[info.method]
    params, kv = info.parameters, info.kv_cache_bytes_per_token_bf16
    plan = SharingPlan(config.num_hidden_layers, tuple(tuple(b) for b in info.plan), tuple(info.dropped))
    print(f"plan: {plan.describe()} ({how})")
    print(f"parameters: teacher {params['teacher']:,}  student {params['student']:,}  "
          f"removed {params['removed']:,} ({params['removed_percent']:.2f}%)")
    print(f"KV cache per token (bf16): teacher {kv['teacher']:,} B  student {kv['student']:,} B")
    b = info.bounds
    print(f"predicted bounds (bf16, teacher time / student time): prefill 1x512 {b['prefill']:.3f}x, "
          f"decode 16 x 1024 context {b['decode']:.3f}x")


EVAL_PROBE = (8, 128)  # retrieval probe scored by `eval`: 8 windows of 128 random tokens, repeated
PROBE_ROW = "retrieval from context (repeated random tokens)"


def evaluate(config: EvalConfig, teacher: Teacher | None = None, known: dict[str, dict] | None = None) -> dict:
    """Held-out perplexity and zero-shot accuracy (lm-eval) of the teacher and each model, side by side. Results are
    keyed `teacher`, `student`, `distilled` (OUT's students) or by folder name (`--models`). `known`: zero-shot
    scores already taken of some of those models (compare: the trade curve's untrained students), not taken again."""
    from transformers import AutoModelForCausalLM

    from echoatt.harness import cached_zero_shot, check_tasks, save_results, zero_shot

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
    probe = teacher.retrieval_probe(*EVAL_PROBE, seed=config.seed)
    record(config, "eval")
    results = {}
    for name, path in {"teacher": None, **paths}.items():
        model = teacher.model if path is None else AutoModelForCausalLM.from_pretrained(path).to(teacher.model.device)
        print(f"evaluating {MODEL_LABELS.get(name, name)}")
        results[name] = {row: {"perplexity": perplexity(model.eval(), windows)} for row, windows in texts.items()}
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


def bench(config: BenchConfig) -> dict:
    """Speed and size, teacher vs student, in one process: a trained pair from OUT, or an architecture (--arch)."""
    from transformers import AutoModelForCausalLM

    from echoatt.bench import ARCHS, arch_config, run_bench, save

    config.validate()
    if config.engine in ("vllm", "llama.cpp"):
        return bench_in_engine(config)
    if config.engine != "torch":
        raise ValueError(f"--engine must be torch, vllm or llama.cpp (got {config.engine!r})")
    setup(config)
    device = torch.device(device_of(config))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if config.arch:
        arch = arch_config(config.arch)
        spec = StudentSpec(plan=config.plan, method=config.method, head_map="identity")
        spec.check(arch.num_hidden_layers)
        print(f"building the {config.arch} architecture with random weights")
        with torch.device(device):  # random weights made on the device, in its dtype (a 7B shape in seconds)
            teacher = AutoModelForCausalLM.from_config(arch, dtype=dtype)
        heads = list(reversed(range(arch.num_attention_heads)))  # a non-identity map, as a matched student has
        maps = [heads] * arch.num_hidden_layers if spec.mapped else None
        student, _ = spec.build(teacher, None, maps)
        name = f"bench-{config.arch if config.arch in ARCHS else Path(config.arch).stem}"
        name += "" if config.method == "copy" else f"-{config.method}"
    else:
        path = Path(config.student) if config.student else RunDir(Path(config.out)).student
        read_student_config(path)
        teacher = load_teacher(config.teacher).model
        student = AutoModelForCausalLM.from_pretrained(path)
        name = "bench"
    run = RunDir(record(config, "bench"))
    for model in (teacher, student):
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    roles = [student.config.role(i) for i in range(student.config.num_hidden_layers)]
    print(f"plan: of {len(roles)} layers, {sum(r in ('copy', 'lisa') for r in roles)} follow "
          f"({student.config.follower_type}) and {roles.count('dropped')} have no attention; "
          f"{device}, {dtype}, {torch.get_num_threads()} threads")
    result = run_bench(teacher, student, config, device)
    print(save(result, run.results(name)))
    return result


def bench_in_engine(config: BenchConfig) -> dict:
    """`bench --engine vllm|llama.cpp`: this run's teacher and student, each run by the engine, timed side by side."""
    from echoatt import serve

    if config.arch:
        raise ValueError(f"--engine {config.engine} times a teacher and its student checkpoint; --arch is for "
                         "--engine torch")
    if config.engine == "vllm":
        serve.parse_cases(config.serve_cases)
    serve.engine_python(config.engine)  # refuse before any work where the engine is nowhere
    student = Path(config.student) if config.student else RunDir(Path(config.out)).distilled
    student = student if is_model_folder(student) else RunDir(Path(config.out)).student
    read_student_config(student)
    teacher = Path(resolve_source(config.teacher))
    run = RunDir(record(config, "bench"))
    if config.engine == "vllm":
        result, name = serve.bench_vllm(config, teacher, student), "bench-vllm"
        table = serve.vllm_markdown(result)
    else:
        result, name = serve.bench_llamacpp(config, teacher, student, run.root / "gguf"), "bench-llamacpp"
        table = serve.llamacpp_markdown(result)
    json_path, md_path = run.results(name)
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(table + "\n")
    print(table)
    return result


def compare(config: CompareConfig) -> dict:
    """The table users pick a method from: teacher, attention drop, plain copy, head-matched copy and LiSA at the
    same layers — or, with `--equal-bound`, each at its own plan of the same predicted speed (and the trade curve
    over several speeds) — each before and after the same distillation budget. Each variant works in OUT/<variant>/."""
    from echoatt.harness import save_results

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
                                      head_map=VARIANTS[name].head_map) for name in names}
    if config.equal_bound:
        curve, untrained = trade_curve(subs, teacher, similarity, run)
        subs = curve_students(config, subs, curve)
    elif config.plan.strip().startswith("budget="):  # the same layers for every method: the head-matched copy's plan
        copy = dataclasses.replace(config, method="copy", head_map="matched")
        effects = block_effects(copy, teacher, spec_of(copy), similarity, run)
        plan = spec_of(copy).sharing_plan(teacher.model.config, similarity, effects.loss if effects else None)
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
            if (info.plan, info.dropped) == (point["plan"], point["dropped"]):
                known = {"student": untrained[VARIANTS[name].label][target]}
        scored = evaluate(dataclasses.replace(sub, models=""), teacher, known)
        results.setdefault("teacher", scored["teacher"])
        results[f"{key}/student"] = scored["student"]
        results[f"{key}/distilled"] = {**scored["distilled"], "trained parameters": {"percent": trained["percent"]}}
        labels |= {f"{key}/student": f"{label} (before KD)", f"{key}/distilled": f"{label} (after KD)"}
        table = save_results(results, run.results("compare"), labels)
        if config.equal_bound:
            speed = quick_speed(sub, RunDir(Path(sub.out)).distilled) if config.speed else {}
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
    from echoatt.harness import cached_zero_shot, zero_shot

    config = next(iter(subs.values()))
    metric, values = config.bound_targets()
    tokenizer = teacher.text_tokenizer("the trade curve")
    texts = perplexity_texts(config, tokenizer)
    probe = teacher.retrieval_probe(*EVAL_PROBE, seed=config.seed)
    tasks, limit = [t for t in config.tasks.split(",") if t], config.limit or None
    scored = cached_zero_shot(teacher.model, tokenizer, tasks, limit, config.eval_batch_size, teacher.stamp())
    untrained: dict[str, dict[float, dict]] = {}
    curve = TradeCurve(metric, curve_perplexities(teacher.model, texts)
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
            effects = block_effects(point, teacher, spec, similarity, RunDir(Path(point.out)))
            try:
                student, plan = spec.build(teacher.model, similarity, block_loss=effects.loss if effects else None)
            except PlanError as err:
                print(f"{label} at {metric} {value}: {err}")
                continue
            calibration, windows = calibration_settings(point, teacher, student)
            if calibration:
                calibrate_followers(student, teacher.model, windows, point.calibrate_ridge, progress=False)
            scores = zero_shot(student, tokenizer, tasks, limit, config.eval_batch_size) if tasks else {}
            untrained.setdefault(label, {})[value] = scores
            curve.add(label, {
                "target": value, "plan": [list(b) for b in plan.blocks], "dropped": list(plan.dropped),
                "followers": len(plan.followers) + len(plan.dropped),
                "bounds": plan_bounds(teacher.model.config, student.config),
                **curve_perplexities(student, texts), "retrieval": retrieval(student, probe)["accuracy"],
                **zero_shot_summary(scores, scored)})
            print(curve.lines()[-1])
            curve.save(run.trade_curve)
    curve.save(run.trade_curve)  # also where no method reached any value: what they reach is the answer then
    return curve, untrained


def curve_perplexities(model, texts: dict[str, torch.Tensor]) -> dict[str, float]:
    """A trade-curve point's perplexities: `perplexity` on the validation split, `other_perplexity` on the other text."""
    return {"perplexity" if row == "held-out text" else "other_perplexity": perplexity(model, windows)
            for row, windows in texts.items()}


def densest_bound(spec: StudentSpec, teacher_config, similarity: Similarity, metric: str) -> float:
    """The bound of a method's densest budget plan, about the most a budget can reach: blocks of `max` layers (default
    3) over the unprotected inner layers for followers (copy, LiSA), and every layer the budget may drop for attention
    drop and mixed plans; the better of the two where a plan may do both."""
    layers, opts = teacher_config.num_hidden_layers, SharingPlan.budget_options(spec.plan.strip())
    protect, max_block = int(opts.get("protect", 1)), int(opts.get("max", 3))
    followers = spec.method != "drop" and "drop-only" not in opts
    plans = [(spec.method, SharingPlan.from_k(layers, max_block, protect_first=protect))] if followers else []
    if spec.method == "drop" or "drop" in opts:
        plans.append(("drop", SharingPlan.from_dropped(layers, set(range(protect + 1, layers - 1)))))
    bounds = [plan_bounds(teacher_config, student_config(
        teacher_config, plan, spec.head_maps(teacher_config, plan, similarity) if m != "drop" else None, m,
        spec.lisa_rank or None, spec.lisa_hidden or None))[metric] for m, plan in plans]
    return min(bounds) if metric in AT_MOST else max(bounds)


def quick_speed(config: RunConfig | CompareConfig, student: Path) -> dict[str, dict]:
    """A short measured speed of `student` against the teacher (`bench` at QUICK_SPEED, written beside it in
    config.out): {figure: {"setting", "ratio", "bound"}}, the ratio on SDPA with its analytic bound."""
    print("timing teacher vs distilled student (`echoatt bench` for the full set)")
    result = bench(BenchConfig(**{k: getattr(config, k) for k in ("teacher", "out", "device", "seed", "threads")},
                               student=str(student), **QUICK_SPEED))
    return {f["figure"]: {"setting": f["setting"], "ratio": f["ratios"]["headline"]["ratio"],
                          "bound": f["ratios"]["headline"]["bound"]} for f in result["figures"]}


def run(config: RunConfig) -> RunSummary:
    """The main job on one teacher: analyze -> share -> distill -> evaluate (perplexity and zero-shot)."""
    from echoatt.harness import check_tasks

    config.validate()
    setup(config)
    check_tasks([t for t in config.tasks.split(",") if t])  # before the long work, not after it
    teacher = load_teacher(config.teacher, device=device_of(config), context=config.seq_len)
    similarity = analyze(config, teacher)
    out = RunDir(record(config, "run"))
    share(config, teacher, similarity)
    distill(config, teacher)
    results = evaluate(config, teacher)
    summary = RunSummary.of(results, config.eval_windows, config.seq_len)
    summary.save(out)
    if config.speed:
        quick_speed(config, out.distilled)
    write_report(out.root)
    p = summary.perplexity
    print(f"validation perplexity ({config.eval_windows} windows of {config.seq_len} tokens): teacher "
          f"{p['teacher']:.2f}, student before KD {p['student_before_kd']:.2f}, after KD {p['student_after_kd']:.2f}")
    if summary.other_text:
        o = summary.other_text["perplexity"]
        print(f"{summary.other_text['text']} perplexity: teacher {o['teacher']:.2f}, student before KD "
              f"{o['student_before_kd']:.2f}, after KD {o['student_after_kd']:.2f} "
              f"({o['student_after_kd'] / o['teacher']:.2f}x the teacher's)")
    if summary.gap_closed_percent is not None:
        print(f"distillation closed {summary.gap_closed_percent:.1f}% of the gap to the teacher")
    print(f"report: {out.report[1]}")
    for line in serving_text(out.distilled, read_student_config(out.distilled)):
        print(line.replace("`", ""))
    return summary


def report(config: ReportConfig) -> None:
    md, page = write_report(config.run)
    print(f"wrote {md} and {page}")
