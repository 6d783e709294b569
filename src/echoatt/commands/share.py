"""Build the student for a plan (`echoatt share`): the run folder claimed, the plan measured and resolved,
the student calibrated and saved."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from echoatt.building.calibrate import calibrate_student, replaced_layers
from echoatt.building.student import (
    StudentSpec,
    kv_cache_bytes_per_token,
    parameter_report,
    plan_bounds,
    save_student,
)
from echoatt.commands.analyze import analyze_with_defaults
from echoatt.inputs.corpus import spread, token_windows
from echoatt.inputs.teacher import Teacher, load_teacher
from echoatt.model.configuration_echoatt import family_fields
from echoatt.model.modeling_echoatt import EchoAttForCausalLM
from echoatt.planning.analysis import Similarity
from echoatt.planning.plan import PlanError, SharingPlan
from echoatt.planning.search import plan_measures
from echoatt.run.config import (
    ShareConfig,
    device_of,
    record,
    setup,
)
from echoatt.run.rundir import RunDir, RunDirError, SharingInfo, describe, identity_of, same_student, student_identity
from echoatt.training.checkpoints import checkpoint_identities


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
        plan=plan.spec(),
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


def check_faster(bounds: dict[str, float], plan: SharingPlan, allowed: bool) -> None:
    """Refuse, before anything is written, a student the cost model predicts slower than its teacher (unless asked
    for): a prefill or decode bound below 1."""
    slower = {k: v for k, v in bounds.items() if k in ("prefill", "decode") and v < 1}
    if slower and not allowed:
        said = ", ".join(f"{k} {v:.3f}x" for k, v in slower.items())
        raise PlanError(f"plan {plan.describe()} is predicted slower than the teacher ({said}): choose a plan that "
                        "saves more (e.g. budget=k=2,drop, or --method drop), or pass --allow-slower to build it")


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
    print(f"plan: {info.sharing_plan().describe()} ({how})")
    print(f"parameters: teacher {params['teacher']:,}  student {params['student']:,}  "
          f"removed {params['removed']:,} ({params['removed_percent']:.2f}%)")
    print(f"KV cache per token (bf16): teacher {kv['teacher']:,} B  student {kv['student']:,} B")
    b = info.bounds
    print(f"predicted bounds (bf16, teacher time / student time): prefill 1x512 {b['prefill']:.3f}x, "
          f"decode 16 x 1024 context {b['decode']:.3f}x")
