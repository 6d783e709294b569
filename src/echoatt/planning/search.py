"""Plan search: what a budget plan is chosen by — each candidate change's measured loss (`sensitivity.py`), kept in
the run folder and reused while what it depends on stays, the closed-form fits replacements are measured after, and
for `long` budgets the whole plan's measured loss — as a library that `share` and `compare` both call."""

from __future__ import annotations

import torch

from echoatt.building.calibrate import apply_fits, replacement_stats
from echoatt.building.repair import repair_briefly
from echoatt.building.student import StudentSpec
from echoatt.inputs.corpus import REPEAT_SPAN, repeat_spans, spread, token_windows
from echoatt.inputs.teacher import Teacher
from echoatt.planning import planners
from echoatt.planning.analysis import Similarity
from echoatt.planning.plan import Change
from echoatt.planning.sensitivity import LONG_RANGE, BlockEffects, effect_inputs, joint_loss, measure_block_effects
from echoatt.run.config import ShareConfig, device_of
from echoatt.run.rundir import RunDir
from echoatt.training.precision import Precision, resolve

EFFECT_TEXT_WINDOWS, EFFECT_PROBE = 1, (2, 128)  # what each candidate block is scored on: cheap, paired with the teacher
EFFECT_FIT_WINDOWS = 4  # other windows the linear and FFN candidates are fitted on before they are scored
EFFECT_LONG_WINDOWS = 2  # other windows a `long` budget scores long-range predictions on (~70 of 512 tokens each)
EFFECT_READ_WINDOWS = 2  # windows of the training text a `read` budget copies spans in (~250 reading predictions each)


def long_windows(train: torch.Tensor) -> torch.Tensor:
    """The windows a `long` budget scores long-range predictions on: spread over the training text, between the
    text and fit windows' places."""
    return spread(train, 2 * EFFECT_LONG_WINDOWS + 1)[1::2]


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
