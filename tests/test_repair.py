"""Local repair: the per-layer loss on the teacher's stream, what it trains, and the stage before distillation."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_teacher

from echoatt.building.repair import LocalLoss, only_layers, repaired_layers
from echoatt.building.student import build_student, save_student
from echoatt.inputs.teacher import load_teacher
from echoatt.planning.plan import SharingPlan
from echoatt.training.distill import distill, set_trainable
from echoatt.training.losses import layer_output_loss


def mixed_student(teacher):
    """Layer 2 leads follower 3 (a head map across KV groups), layer 4's attention is dropped."""
    return build_student(teacher, SharingPlan(6, ((2, 3),), dropped=(4,)), [None, None, None, [2, 3, 0, 1], None, None])


def test_layer_output_loss_by_hand():
    x, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert layer_output_loss(t, x, t) == 0
    assert layer_output_loss(x, x, t).item() == pytest.approx(1.0)  # skipping the layer
    s = t + 0.1 * torch.randn(2, 5, 8)
    assert layer_output_loss(s, x, t).item() == pytest.approx((((s - t) ** 2).sum() / ((t - x) ** 2).sum()).item())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_local_loss_is_each_changed_layer_fed_the_teachers_input(family):
    """A dropped layer's loss, by hand: the teacher's hidden state h at its input, h + MLP(norm(h)) against the
    teacher layer's output; the mean over the changed layers is the loss."""
    teacher = tiny_teacher(1, family)
    student = mixed_student(teacher)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        h = teacher(input_ids=ids, output_hidden_states=True).hidden_states  # h[i]: layer i's input (i < L)
        layer = student.model.layers[4]
        dropped = h[4] + layer.mlp(layer.post_attention_layernorm(h[4]))
        by_hand = layer_output_loss(dropped, h[4], h[5])
    terms = LocalLoss(next_too=False)(student, teacher, ids)
    assert repaired_layers(student.config, False) == [3, 4]
    assert terms["layer_4"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((terms["layer_3"] + terms["layer_4"]).item() / 2)
    assert len(student.model.layers) == 6  # every layer back after the call


def test_the_local_loss_trains_only_the_repaired_layers():
    teacher = tiny_teacher(1)
    student = mixed_student(teacher)
    trained = set_trainable(student, "changed")
    assert {int(n.split(".")[2]) for n in trained} == {3, 4}
    LocalLoss(next_too=False)(student, teacher, torch.randint(3, 100, (2, 12)))["loss"].backward()
    grads = {int(n.split(".")[2]) for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {3, 4}
    set_trainable(student, "shared")
    student.zero_grad()
    LocalLoss(next_too=True)(student, teacher, torch.randint(3, 100, (2, 12)))["loss"].backward()
    grads = {int(n.split(".")[2]) for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {3, 4, 5}  # layer 5 learns from layer 4's repaired output, and layer 4 from layer 5's error


def test_only_layers_restores_the_model_when_the_forward_fails():
    student = mixed_student(tiny_teacher(1))
    with pytest.raises(RuntimeError), only_layers(student, [2, 3], {}, {}):
        assert len(student.model.layers) == 2
        raise RuntimeError("interrupted")
    assert len(student.model.layers) == 6 and not student.model.layers[2]._forward_hooks


def test_repair_runs_before_distillation_and_lowers_the_local_loss(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from echoatt.inputs.corpus import token_windows
    from echoatt.run.config import DistillConfig

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    teacher = load_teacher(str(teacher_dir))
    save_student(mixed_student(teacher.model), teacher.tokenizer, tmp_path / "run" / "student")
    config = DistillConfig(teacher=str(teacher_dir), corpus=str(corpus_dir), seq_len=32, out=str(tmp_path / "run"),
                           steps=2, local_steps=8, batch_size=2, grad_accum=1, eval_windows=2,
                           device="cpu")
    result = distill(config, teacher)
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "repair_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 8 and {"layer_3", "layer_4", "layer_5"} <= set(steps[0])
    ids = token_windows(teacher.tokenizer, str(corpus_dir), 32)[1][:4]  # held-out text of the same kind
    before = LocalLoss()(AutoModelForCausalLM.from_pretrained(run / "student"), teacher.model, ids)["loss"]
    after = LocalLoss()(AutoModelForCausalLM.from_pretrained(run / "student-repaired"), teacher.model, ids)["loss"]
    assert after < before
    repaired_ppl = [e for e in log if "val_ppl" in e][-1]["val_ppl"]
    distill_log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert distill_log[0] == {"step": 0, "val_ppl": pytest.approx(repaired_ppl)}  # distillation starts from it
    assert (run / "checkpoints-repair").is_dir() and (run / "repair.yaml").is_file()
    assert result["student"] == run / "student-distilled"
    distill(replace(config, steps=3), teacher)  # run again, longer: the repair resumes from its last checkpoint, done
    assert len([line for line in (run / "repair_log.jsonl").read_text().splitlines() if '"loss"' in line]) == 8
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()][-1] == 3
