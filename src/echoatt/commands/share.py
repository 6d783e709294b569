"""Build the student for a plan (`echoatt share`): the run folder claimed, the plan measured and resolved,
the student calibrated and saved."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from echoatt import planners
from echoatt.analysis import Similarity
from echoatt.calibrate import (
    apply_fits,
    calibrate_followers,
    fit_replacements,
    replaced_layers,
    replacement_stats,
)
from echoatt.checkpoints import checkpoint_identities
from echoatt.commands.analyze import analyze_with_defaults
from echoatt.config import (
    ShareConfig,
    record,
)
from echoatt.configuration_echoatt import family_fields
from echoatt.corpus import REPEAT_SPAN, repeat_spans, spread, token_windows
from echoatt.modeling_echoatt import EchoAttForCausalLM
from echoatt.plan import Change, PlanError, SharingPlan
from echoatt.precision import Precision, resolve
from echoatt.repair import repair_briefly
from echoatt.rundir import (
    RunDir,
    RunDirError,
    SharingInfo,
    describe,
    device_of,
    identity_of,
    same_student,
    setup,
    student_identity,
)
from echoatt.sensitivity import LONG_RANGE, BlockEffects, effect_inputs, joint_loss, measure_block_effects
from echoatt.student import (
    StudentSpec,
    kv_cache_bytes_per_token,
    parameter_report,
    plan_bounds,
    save_student,
)
from echoatt.teacher import Teacher, load_teacher


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
    student, plan = spec.build(teacher.model, similarity, **plan_measures(config, teacher, spec, similarity, run))
    check_faster(plan_bounds(teacher.model.config, student.config), plan, config.allow_slower)
    calibration, windows = calibration_settings(config, teacher, student)
    identity = student_identity(student.config, teacher.name, calibration)
    claim_run_folder(run, identity, config.overwrite)
    record(config, "share")
    if calibration:
        calibration = calibration | calibrate_student(student, teacher.model, windows, config.calibrate_ridge)
    info = SharingInfo(
        identity=identity,
        plan=[list(b) for b in plan.blocks],
        dropped=list(plan.dropped),
        linear=list(plan.linear),
        ffn=[list(f) for f in plan.ffn],
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


def calibrate_student(student, teacher, windows: torch.Tensor, ridge: float, progress: bool = True) -> dict:
    """Every closed-form fit a new student gets, in place: its followers' o_proj (`calibrate_followers`), its linear
    attention and narrowed FFNs (`fit_replacements`); returns their mean errors before and after."""
    followers = calibrate_followers(student, teacher, windows, ridge, progress=progress)
    replaced = fit_replacements(student, teacher, windows, ridge, progress=progress)
    for done, what in ((followers, "followers' o_proj"), (replaced, "linear attention and narrowed FFNs")):
        if done.after and progress:
            print(done.summary(what))
    return followers.means() | {f"replaced_{k}": v for k, v in replaced.means().items()}


def check_faster(bounds: dict[str, float], plan: SharingPlan, allowed: bool) -> None:
    """Refuse, before anything is written, a student the cost model predicts slower than its teacher (unless asked
    for): a prefill or decode bound below 1."""
    slower = {k: v for k, v in bounds.items() if k in ("prefill", "decode") and v < 1}
    if slower and not allowed:
        said = ", ".join(f"{k} {v:.3f}x" for k, v in slower.items())
        raise PlanError(f"plan {plan.describe()} is predicted slower than the teacher ({said}): choose a plan that "
                        "saves more (e.g. budget=k=2,drop, or --method drop), or pass --allow-slower to build it")


EFFECT_TEXT_WINDOWS, EFFECT_PROBE = 1, (2, 128)  # what each candidate block is scored on: cheap, paired with the teacher
EFFECT_FIT_WINDOWS = 4  # other windows the linear and FFN candidates are fitted on before they are scored
EFFECT_LONG_WINDOWS = 2  # other windows a `long` budget scores long-range predictions on (~70 of 512 tokens each)


def long_windows(train: torch.Tensor) -> torch.Tensor:
    """The windows a `long` budget scores long-range predictions on: spread over the training text, between the
    text and fit windows' places."""
    return spread(train, 2 * EFFECT_LONG_WINDOWS + 1)[1::2]


EFFECT_READ_WINDOWS = 2  # windows of the training text a `read` budget copies spans in (~250 reading predictions each)


def reading_windows(train: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a `read` budget charges for reading on: windows of the training text (apart from the others' places) with
    their second half copied from their first at several distances, and which predictions read a copy."""
    return repeat_spans(spread(train, EFFECT_READ_WINDOWS + 2)[1:-1], seed)


def budget_asks(spec: StudentSpec, option: str) -> bool:
    """Whether `spec`'s plan is a budget with `option` (`long`, `read`: what its candidates are measured on)."""
    plan = spec.plan.strip()
    return plan.startswith("budget=") and option in planners.budget_options(plan)


def is_long(spec: StudentSpec) -> bool:
    return budget_asks(spec, "long")


def measure_inputs(config: ShareConfig, spec: StudentSpec, train: torch.Tensor) -> dict:
    """The windows a budget's candidates are scored on beyond text and probe, as `sensitivity.effect_inputs` takes
    them: long-range predictions (`long`) and in-context copies (`read`), where the plan asks."""
    return ({"long": long_windows(train)} if is_long(spec) else {}) | (
        {"reading": reading_windows(train, config.seed)} if budget_asks(spec, "read") else {})


def plan_measures(config: ShareConfig, teacher: Teacher, spec: StudentSpec, similarity: Similarity | None,
                  run: RunDir) -> dict:
    """What a budget plan is chosen by, as `StudentSpec.build` takes it: each candidate's measured loss
    (`block_effects`) and, for a `long` budget, a whole plan's (`sensitivity.joint_loss`, on the same terms, the
    replacements fitted as the candidates were); nothing for other plans."""
    effects = block_effects(config, teacher, spec, similarity, run)
    if effects is None:
        return {}
    if not is_long(spec):
        return {"block_loss": effects.loss}
    train, _ = token_windows(teacher.tokenizer, config.corpus, config.seq_len, config.encoding)
    candidates = planners.budget_candidates(spec.plan.strip(), teacher.model.config.num_hidden_layers,
                                            teacher.model.config.intermediate_size)
    fit = candidate_fits(teacher.model, candidates, spread(train[EFFECT_TEXT_WINDOWS:], EFFECT_FIT_WINDOWS),
                         config.calibrate_ridge)
    inputs = effect_inputs(spread(train, EFFECT_TEXT_WINDOWS), teacher.retrieval_probe(*EFFECT_PROBE, seed=config.seed),
                           **measure_inputs(config, spec, train))
    joint = joint_loss(teacher.model, spec, similarity, inputs, fit, measuring_precision(config))
    return {"block_loss": effects.loss, "joint": joint}


def measuring_precision(config: ShareConfig) -> Precision:
    """What the candidates' forward passes run in (`--bf16`; the fits and repairs stay fp32)."""
    return resolve(config.bf16, device_of(config))


def candidate_fits(teacher, candidates: list[Change], windows: torch.Tensor, ridge: float):
    """For linear-attention and FFN candidates: one pass of the teacher's statistics over `windows` for all of them
    (`calibrate.replacement_stats`), and the function fitting one candidate's student from them; None without such
    candidates."""
    linear = sorted({c.first for c in candidates if c.kind == "linear"})
    widest: dict[int, int] = {}
    for c in candidates:
        if c.kind == "ffn" and c.width:
            widest[c.first] = max(widest.get(c.first, 0), c.width)
    if not linear and not widest:
        return None
    stats = replacement_stats(teacher, windows, linear, widest)
    return lambda student: apply_fits(student, teacher, stats, ridge)


def block_effects(config: ShareConfig, teacher: Teacher, spec: StudentSpec, similarity: Similarity | None,
                  run: RunDir) -> BlockEffects | None:
    """For a budget plan, the measured loss of each candidate block (`sensitivity.py`), kept in the run folder
    beside the analysis and reused while teacher, method, head map and text stay the same; None for other plans or
    a teacher without tokenizer (the similarity then predicts the loss)."""
    if (not spec.plan.strip().startswith("budget=") or teacher.tokenizer is None
            or spec.drop_ranking(similarity) is not None):  # attention drop ranks by its own criterion
        return None
    candidates = planners.budget_candidates(spec.plan.strip(), teacher.model.config.num_hidden_layers,
                                            teacher.model.config.intermediate_size)
    settings = block_effect_settings(config, teacher, spec, similarity)
    effects = BlockEffects.load(run.block_effects) or BlockEffects({}, {}, settings)
    known = effects.known(settings)
    missing = [b for b in candidates if b not in known]
    if missing:  # measure what is not known yet under these settings
        train, _ = token_windows(teacher.tokenizer, config.corpus, config.seq_len, config.encoding)
        probe = teacher.retrieval_probe(*EFFECT_PROBE, seed=config.seed)
        repair = None
        if config.repair_blocks:  # on other windows than the one each block is then scored on
            windows = spread(train[EFFECT_TEXT_WINDOWS:], 2 * config.repair_blocks)
            repair = lambda student: repair_briefly(student, teacher.model, windows, config.repair_blocks)
        fit = candidate_fits(teacher.model, missing, spread(train[EFFECT_TEXT_WINDOWS:], EFFECT_FIT_WINDOWS),
                             config.calibrate_ridge)
        precision = measuring_precision(config)
        print(f"measuring {len(missing)} candidates: {precision.line()}")
        fresh = measure_block_effects(teacher.model, spec, similarity, missing, spread(train, EFFECT_TEXT_WINDOWS),
                                      probe, settings, repair=repair, fits=fit, precision=precision,
                                      **measure_inputs(config, spec, train))
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
    settings = {"teacher": teacher.stamp(), "method": spec.method, "head_map": spec.head_map, "analysis": maps,
                "corpus": config.corpus, "encoding": config.encoding, "seq_len": config.seq_len, "seed": config.seed,
                "text_windows": EFFECT_TEXT_WINDOWS, "probe": list(EFFECT_PROBE), "fit_windows": EFFECT_FIT_WINDOWS,
                "fit_ridge": config.calibrate_ridge}
    bf16 = measuring_precision(config).bf16  # fp32 measurements keep the key they had before bf16 existed
    return (settings | ({"repair_steps": config.repair_blocks} if config.repair_blocks else {})
            | ({"precision": "bf16 autocast"} if bf16 else {})
            | ({"long": [EFFECT_LONG_WINDOWS, LONG_RANGE]} if is_long(spec) else {})
            | ({"read": [EFFECT_READ_WINDOWS, REPEAT_SPAN]} if budget_asks(spec, "read") else {}))


def calibration_settings(config: ShareConfig, teacher: Teacher, student) -> tuple[dict | None, torch.Tensor | None]:
    """What the refit of the followers will use (settings, and the training windows, read now so that a corpus that
    cannot be used is refused before the run folder is touched); None where there is nothing to refit or no text."""
    followers = bool(student.config.followers())
    if not config.calibrate or not (followers or any(replaced_layers(student.config))):
        return None, None
    if teacher.tokenizer is None:
        print(f"the teacher has no tokenizer ({teacher.tokenizer_error}): nothing is calibrated (a linear attention "
              "stays at zero, a narrowed FFN keeps the channels its weights rank first)")
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
    plan = SharingPlan(config.num_hidden_layers, tuple(tuple(b) for b in info.plan), tuple(info.dropped),
                       tuple(info.linear), tuple(tuple(f) for f in info.ffn))
    print(f"plan: {plan.describe()} ({how})")
    print(f"parameters: teacher {params['teacher']:,}  student {params['student']:,}  "
          f"removed {params['removed']:,} ({params['removed_percent']:.2f}%)")
    print(f"KV cache per token (bf16): teacher {kv['teacher']:,} B  student {kv['student']:,} B")
    b = info.bounds
    print(f"predicted bounds (bf16, teacher time / student time): prefill 1x512 {b['prefill']:.3f}x, "
          f"decode 16 x 1024 context {b['decode']:.3f}x")
