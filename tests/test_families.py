"""Every supported family (conftest.FAMILIES: Llama, Llama-3 style, Mistral, Qwen2, Qwen3) end to end, each on a tiny
random teacher of its own transformers config class: exactness of the unshared student, loading without echoatt,
the command line's whole pipeline, every method, two processes, GGUF teachers, and the cost model on real shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, TEXT, TOY, path_tolerance, tiny_teacher, trained_teacher
from gguf_file import write_gguf
from transformers import AutoConfig, AutoModelForCausalLM

from echoatt.building.student import build_student, kv_cache_bytes_per_token, plan_bounds, student_config
from echoatt.cli import main
from echoatt.inputs.teacher import load_teacher
from echoatt.model.archs import ARCHS, arch_config
from echoatt.model.modeling_echoatt import CACHE_KWARG, output_cache
from echoatt.planning import planners
from echoatt.planning.plan import SharingPlan

MAPS = [None, None, [1, 0, 3, 2], None, [2, 2, 0, 1], None]


def ids(batch=2, length=12, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def saved_teacher(path: Path, tokenizer, family: str) -> Path:
    """A tiny trained teacher of `family` with the test tokenizer (+8 embedding rows: Qwen2Tokenizer adds a token)."""
    trained_teacher(tokenizer, family, vocab_size=len(tokenizer) + 8).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=list(FAMILIES))
def family_teacher_dir(request, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    return saved_teacher(tmp_path / request.param, tokenizer, request.param)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_an_unshared_student_is_its_teacher(teacher, impl):
    """Single sequence, left-padded batch, and cached decoding: the student with no sharing gives the teacher's logits."""
    teacher.config._attn_implementation = impl
    student = build_student(teacher, SharingPlan(6, ()))
    assert student.config.family == teacher.config.model_type
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # the second row is left-padded
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, teacher(x).logits, atol=1e-5, rtol=0)
        padded = {"attention_mask": mask, "position_ids": position_ids}
        torch.testing.assert_close(student(x, **padded).logits[1, 5:], teacher(x, **padded).logits[1, 5:],
                                   atol=1e-5, rtol=0)
        steps = {}
        for name, model in (("student", student), ("teacher", teacher)):
            cache = output_cache(model(x[:, :8], use_cache=True))
            logits = []
            for t in range(8, 12):
                out = model(x[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
                cache, logits = output_cache(out), [*logits, out.logits[:, -1]]
            steps[name] = torch.stack(logits)
        torch.testing.assert_close(steps["student"], steps["teacher"], atol=1e-5, rtol=0)  # like with like
        full = teacher(x).logits[:, 8:].transpose(0, 1)  # cached vs one full forward: two paths, the teacher's own gap
        torch.testing.assert_close(steps["student"], full, atol=path_tolerance(steps["teacher"], full), rtol=0)


def test_a_sliding_window_student_refuses_contexts_past_the_window():
    teacher = tiny_teacher(family="mistral", sliding_window=16)
    student = build_student(teacher, SharingPlan(6, ((1, 2),)), MAPS)
    assert student.config.context_window == 16
    unshared = build_student(teacher, SharingPlan(6, ()))
    with torch.no_grad():
        torch.testing.assert_close(unshared(ids(length=16)).logits, teacher(ids(length=16)).logits, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="17 tokens is longer than the teacher's sliding window \\(16\\)"):
            student(ids(length=17))
    with pytest.raises(ValueError, match="sliding window"):
        student.generate(ids(batch=1, length=12), max_new_tokens=8, do_sample=False, pad_token_id=0)


REMOTE = textwrap.dedent("""
    import sys, importlib.abc, torch
    class NoEchoatt(importlib.abc.MetaPathFinder):  # as on a machine where echoatt is not installed
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "echoatt":
                raise ImportError("echoatt is not installed here")
    sys.meta_path.insert(0, NoEchoatt())
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert "echoatt" not in sys.modules
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
""")


def test_a_student_loads_with_remote_code_where_echoatt_is_absent(teacher, tmp_path):
    student = build_student(teacher, SharingPlan(6, ((1, 2), (3, 4))), MAPS)
    student.save_pretrained(tmp_path / "student")
    torch.save(ids(), tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    args = [str(tmp_path / name) for name in ("student", "ids.pt", "logits.pt")]
    done = subprocess.run([sys.executable, "-c", REMOTE, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), student(ids()).logits)


def test_the_whole_run_on_each_family(family_teacher_dir, corpus_dir, tmp_path, capsys):
    """`echoatt run` (analysis, a measured mixed budget plan, calibration, distillation, perplexity, speed). The
    default's absolute target (decode >= 1.15) is for real models: a 6-layer toy may not reach it, so the plan here is
    relative (at least blind k=2's speed)."""
    out = tmp_path / "run"
    args = ["run", "--teacher", str(family_teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
            "--plan", "budget=k=2,drop",
            "--out", str(out), "--num-sequences", "4", "--steps", "8", "--batch-size", "2", "--grad-accum", "1",
            "--eval-windows", "4", "--lr", "3e-4", "--warmup-steps", "2", "--tasks", "", *TOY]
    assert main(args) == 0
    family = AutoConfig.from_pretrained(family_teacher_dir).model_type
    info = json.loads((out / "student" / "sharing.json").read_text())
    assert info["family"]["family"] == family and info["family"]["architectures"]
    if SharingPlan.read(info["plan"], 6).followers:  # copy followers were refit (a plan of dropped layers only has none)
        assert info["calibration"]["error_after"] < info["calibration"]["error_before"]
    ppl = json.loads((out / "summary.json").read_text())["perplexity"]
    assert ppl["student_after_kd"] < ppl["student_before_kd"], ppl
    student = AutoModelForCausalLM.from_pretrained(out / "student-distilled")
    assert student.config.family == family and student.config.attention_changed()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    x = torch.tensor([[5, 6, 7]])
    assert torch.equal(student.generate(x, use_cache=True, **kw), student.generate(x, use_cache=False, **kw))


def test_every_method_on_each_family(family_teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--teacher", str(family_teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32",
                 "--out", str(out), "--methods", "drop,identity,matched,lisa,mixed", "--steps", "1",
                 "--batch-size", "1", "--grad-accum", "1", "--eval-windows", "2", "--tasks", "",
                 "--plan", "budget=k=2,drop"]) == 0
    results = json.loads((out / "compare.json").read_text())["results"]
    for method in ("drop", "identity", "matched", "lisa", "mixed"):
        assert f"{method}/distilled" in results
        assert AutoConfig.from_pretrained(out / method / "student").attention_changed()


def test_two_processes_train_each_family(family_teacher_dir, corpus_dir, tmp_path):
    teacher = load_teacher(str(family_teacher_dir))
    run = tmp_path / "run"
    build_student(teacher.model, planners.from_k(6, 2)).save_pretrained(run / "student")
    teacher.tokenizer.save_pretrained(run / "student")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(worker), str(run), str(family_teacher_dir), str(corpus_dir)]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    ranks = json.loads((run / "checksums.json").read_text())
    assert len(ranks) == 2 and ranks[0]["memory"] == ranks[1]["memory"] == ranks[0]["disk"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])  # what transformers' GGUF loader reads
def test_a_gguf_teacher_of_each_family(family, tokenizer, tmp_path, monkeypatch, corpus_dir):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    model = tiny_teacher(family=family, vocab_size=len(tokenizer) + 8)
    path = write_gguf(model, tokenizer, tmp_path / f"{family}.gguf")
    teacher = load_teacher(str(path))
    assert teacher.model.config.model_type == ("llama" if family == "mistral" else family)  # llama.cpp's arch for
    assert teacher.tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]  # Mistral is llama (no window)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(ids()).logits, model(ids()).logits, atol=1e-5, rtol=0)
    out = tmp_path / "share"
    assert main(["share", "--teacher", str(path), "--corpus", str(corpus_dir), "--seq-len", "32", "--out", str(out),
                 "--plan", "k=2", "--calibrate", "4", *TOY]) == 0
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.followers() == [2, 4]


@pytest.mark.parametrize("name", list(ARCHS))
def test_the_cost_model_on_each_familys_real_shape(name):
    config = arch_config(name)
    assert config.model_type == ARCHS[name]["model_type"]
    plan = planners.from_k(config.num_hidden_layers, 2)
    student = student_config(config, plan)
    bounds = plan_bounds(config, student)
    assert bounds["prefill"] > 1 and bounds["decode"] > 1
    kept = config.num_hidden_layers - len(plan.followers) / 2  # followers keep V, not K
    assert bounds["kv"] == pytest.approx(kept / config.num_hidden_layers)
    assert kv_cache_bytes_per_token(config) == 2 * config.num_hidden_layers * config.num_key_value_heads * 2 * (
        ARCHS[name].get("head_dim") or config.hidden_size // config.num_attention_heads)
    assert student.qk_norm == (config.model_type == "qwen3") and student.family == config.model_type


def test_bench_measures_an_architecture_of_each_family(tmp_path):
    for family in FAMILIES:
        path = tmp_path / f"{family}.json"
        config = tiny_teacher(family=family).config.to_dict()
        path.write_text(json.dumps(config))
        assert main(["bench", "--arch", str(path), "--out", str(tmp_path / family), "--prefill", "16",
                     "--decode", "1x16", "--train-len", "0", "--repeats", "1", "--warmup", "0"]) == 0
        result = json.loads(next((tmp_path / family).glob("bench-*.json")).read_text())
        assert result["figures"]


@pytest.mark.parametrize(("max_window_layers", "window"), [(3, 16), (6, None)])
def test_qwen_slides_only_where_its_layer_types_say(max_window_layers, window):
    """Qwen's `use_sliding_window` applies from `max_window_layers` on: a window the student must honour only where
    some layer slides."""
    teacher = tiny_teacher(family="qwen2", use_sliding_window=True, sliding_window=16,
                           max_window_layers=max_window_layers)
    assert build_student(teacher, SharingPlan(6, ())).config.context_window == window
