"""echoatt in one Python call: `echoatt.compress` does what `echoatt run` does — analyse, plan, share, calibrate,
distil, evaluate and report — on a model path, a hub id, a `.gguf` file or a model object, and returns the distilled
student with its numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from echoatt.run.config import RunConfig, load_yaml
from echoatt.run.results import RunSummary
from echoatt.run.rundir import RunDir


@dataclass
class Compressed:
    """What `compress` made: the distilled student (a `transformers` model), the run's headline numbers, and the
    run folder holding everything else (the student before distillation, `eval.md`, `report.md`, `report.html`)."""

    student: PreTrainedModel
    summary: RunSummary
    folder: Path

    @property
    def report(self) -> Path:
        return RunDir(self.folder).report[0]


def compress(teacher: str | PreTrainedModel = "default", tokenizer=None, *, recipe: str | Path | dict | None = None,
             **options: Any) -> Compressed:
    """Make a faster student of `teacher` and distil it back to quality, as `echoatt run` does, with its defaults.

    teacher: a model folder, hub id, `.gguf` file or `default` (SmolLM2-135M), or a model object (then `tokenizer`
        too, for the analysis, calibration, distillation text and evaluation).
    recipe: a YAML file of options (as `echoatt run --config`, e.g. `configs/gpu-1b.yaml`) or a dict of them.
    options: any option of `echoatt run`, by its field name (`plan="budget=decode=1.2,drop"`, `steps=100`,
        `out="runs/mine"`, `tasks=""` ...); they override the recipe.
    """
    from echoatt.commands.run import run
    from echoatt.inputs.teacher import Teacher

    values = load_yaml(RunConfig, recipe) if isinstance(recipe, str | Path) else dict(recipe or {})
    values |= options
    loaded = None
    if isinstance(teacher, PreTrainedModel):
        loaded = Teacher.of(teacher, tokenizer)
        values["teacher"] = loaded.name
    else:
        values["teacher"] = str(teacher)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown options {unknown}: compress takes the options of `echoatt run`")
    config = RunConfig(**values)
    config.validate()
    summary = run(config, loaded)
    folder = Path(config.out)
    return Compressed(AutoModelForCausalLM.from_pretrained(RunDir(folder).distilled), summary, folder)
