"""The recipes users copy (configs/*.yaml) and the one-call Python API (`echoatt.compress`, examples/compress.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_teacher

from echoatt.cli import COMMANDS
from echoatt.run.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
TINY = {"seq_len": 32, "steps": 2, "batch_size": 1, "grad_accum": 1, "eval_windows": 2, "num_sequences": 2,
        "calibrate": 2, "tasks": "", "speed": False, "warmup_steps": 1, "plan": "budget=k=2,drop",
        "allow_slower": True}  # a 6-layer toy: its k=2 student is predicted slower than it (a real model's is not)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_is_read_by_every_command(recipe):
    """One recipe serves run, share, distill, eval and the rest: each takes the options that are its own, and
    the options are valid (checked as the command line checks them, before anything loads)."""
    assert RECIPES
    named = set(yaml.safe_load(recipe.read_text()))
    taken = set()
    for cls, _, _ in COMMANDS.values():
        values = load_yaml(cls, recipe)
        taken |= set(values)
        if cls.__name__ in ("RunConfig", "ShareConfig", "DistillConfig", "EvalConfig", "AnalyzeConfig"):
            cls(**{**values, "device": "cpu"} if "device" in values else values).validate()  # this CPU's check
    assert taken == named  # every option in it is some command's


def test_the_gpu_recipes_plan_fits_the_models_it_names():
    """configs/gpu-1b.yaml's budget, priced by the cost model on the 1–2B shapes it names: attention and KV are a
    smaller share of their decode bytes than of SmolLM2's, so a budget set for SmolLM2 (decode 1.25: 12 of
    Llama-3.2-1B's 16 layers' attention dropped) would gut them; this one drops at most about a third."""
    from echoatt.building.student import plan_bounds, student_config
    from echoatt.model.archs import arch_config
    from echoatt.planning import planners
    from echoatt.planning.plan import SharingPlan

    plan = yaml.safe_load((ROOT / "configs" / "gpu-1b.yaml").read_text())["plan"]
    target = float(planners.budget_options(plan)["decode"])
    for name in ("llama-3.2-1b", "tinyllama"):
        config = arch_config(name)
        n = config.num_hidden_layers
        needed = next(k for k in range(n) if plan_bounds(config, student_config(
            config, SharingPlan(n, (), tuple(range(1, 1 + k)))))["decode"] >= target)
        assert 0 < needed <= -(-n // 3), (name, needed)


def test_a_misspelt_recipe_option_is_refused_with_the_nearest(tmp_path):
    from echoatt.run.config import RunConfig

    (tmp_path / "r.yaml").write_text("plan: k=2\nsteeps: 3\n")
    with pytest.raises(ValueError, match=r"unknown options \['steeps'\] \(did you mean steps"):
        load_yaml(RunConfig, tmp_path / "r.yaml")


def test_the_python_example_runs(tmp_path, tokenizer, corpus_dir):
    """examples/compress.py, as the README shows it, on a tiny teacher and a tiny recipe."""
    teacher = tiny_teacher(vocab_size=len(tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "corpus": str(corpus_dir)}))
    env = {**os.environ, "ECHOATT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "compress.py"), str(tmp_path / "teacher"),
                           str(tmp_path / "tiny.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "student_after_kd" in done.stdout and (tmp_path / "runs" / "compress" / "report.md").is_file()


def test_compress_takes_a_model_object(tmp_path, tokenizer, corpus_dir, monkeypatch):
    """A model object and its tokenizer as the teacher: the student is distilled from it, and caches keyed by the
    teacher tell two objects of the same name apart (their weights differ)."""
    import echoatt
    from echoatt.inputs.teacher import Teacher

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    model = tiny_teacher(vocab_size=len(tokenizer))
    result = echoatt.compress(model, tokenizer, out=str(tmp_path / "run"), corpus=str(corpus_dir), **TINY)
    assert result.student.config.attention_changed() and result.summary.perplexity["student_after_kd"] > 0
    assert Teacher.of(model, tokenizer).stamp() != Teacher.of(tiny_teacher(seed=1), tokenizer).stamp()
    with pytest.raises(ValueError, match="unknown options"):
        echoatt.compress(model, tokenizer, stepz=3)
