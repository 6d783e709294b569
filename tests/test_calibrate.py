"""Calibration: each follower's o_proj refit by ridge least squares on the teacher's stream."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, TOY, tiny_teacher

from echoatt.building.calibrate import calibrate_followers, fit_replacements
from echoatt.building.student import build_student
from echoatt.planning.plan import SharingPlan

MAPS = [None, None, [1, 0, 3, 2], None, [2, 2, 0, 1], None]


def windows(n=24, length=24, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["copy", "lisa"])
def test_refit_lowers_the_followers_error_and_touches_nothing_else(method):
    teacher = tiny_teacher()
    maps = MAPS if method == "copy" else [None, None, [1, 0, 3, 2], [2, 2, 0, 1], None, None]
    student = build_student(teacher, SharingPlan(6, ((1, 2), (3, 4)) if method == "copy" else ((1, 2, 3),)),
                            maps, method=method)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = calibrate_followers(student, teacher, windows(), ridge=1e-4, progress=False)
    followers = student.config.followers()
    assert set(report.after) == set(followers)
    for i in followers:
        assert report.after[i] < 0.9 * report.before[i], (i, report.before[i], report.after[i])
    for name, value in student.state_dict().items():
        changed = not torch.equal(value, before[name])
        refit = any(name == f"model.layers.{i}.self_attn.o_proj.weight" for i in followers)
        assert changed == refit, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_refit_is_the_least_squares_solution(family):
    """With a vanishing ridge, a follower whose borrowed attention is exactly its own gets back the o_proj that
    reproduces the teacher layer's output — with the o_proj bias of a family that has one (llama3 here) kept, so
    the fit's target is the output less that bias."""
    teacher = tiny_teacher(family=family)
    first, second = teacher.model.layers[1], teacher.model.layers[2]
    with torch.no_grad():  # layer 1 adds nothing and layer 2 attends as it does, so reading layer 1's attention is exact
        for module in (first.self_attn.o_proj, first.mlp.down_proj):
            for param in module.parameters():
                param.zero_()
        for name in ("q_proj", "k_proj", "q_norm", "k_norm"):  # all that makes Q and K: weights, biases, norms
            if hasattr(first.self_attn, name):
                getattr(second.self_attn, name).load_state_dict(getattr(first.self_attn, name).state_dict())
        second.input_layernorm.weight.copy_(first.input_layernorm.weight)
    student = build_student(teacher, SharingPlan(6, ((1, 2),)))
    o_proj = student.model.layers[2].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.normal_()  # spoil it; the refit must find it again
    report = calibrate_followers(student, teacher, windows(), ridge=1e-9, progress=False)
    assert report.before[2] > 0.5 and report.after[2] < 1e-6
    if o_proj.bias is not None:
        assert torch.equal(o_proj.bias, second.self_attn.o_proj.bias)
    with torch.no_grad():  # the refit layer, bias included, gives the teacher's output: the whole model is the teacher
        x = windows(n=2)
        torch.testing.assert_close(student(x).logits, teacher(x).logits, atol=1e-3, rtol=1e-3)


def test_share_calibrates_by_default_and_records_it(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    from echoatt.cli import main

    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    args = ["share", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32", "--plan", "1-2",
            *TOY]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--out", str(tmp_path / "off"), "--calibrate", "0"]) == 0
    on = json.loads((tmp_path / "on" / "student" / "sharing.json").read_text())["calibration"]
    assert on["windows"] == 32 and on["error_after"] < on["error_before"]
    assert json.loads((tmp_path / "off" / "student" / "sharing.json").read_text())["calibration"] is None
    weights = {k: load_file(tmp_path / k / "student" / "model.safetensors") for k in ("on", "off")}
    name = "model.layers.2.self_attn.o_proj.weight"
    assert not torch.equal(weights["on"][name], weights["off"][name])  # the follower's O was refit
    leader = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(weights["on"][leader], weights["off"][leader])  # nothing else was
    # Another calibration is another student: the folder refuses it (and would never resume its checkpoints).
    assert main([*args, "--out", str(tmp_path / "on"), "--calibrate", "0"]) == 2
    assert main([*args, "--out", str(tmp_path / "on")]) == 0  # the same one again is welcome


def test_replacements_are_the_least_squares_fits_and_touch_nothing_else():
    """`fit_replacements` on a linear attention, a narrowed FFN and an FFN-free layer: the linear map is the ridge
    solution from the teacher's normed input to its attention output there; the narrowed FFN keeps the channels that
    contribute most on the text (a channel made silent is never kept) and its down projection is refitted to the full
    FFN's output; nothing else moves, and the FFN-free layer has nothing to fit."""
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.model.layers[3].mlp.up_proj.weight[:16].zero_()  # 16 silent channels: never among the kept
    student = build_student(teacher, SharingPlan.read("linear=2,ffn=3:32,ffn=4:0", 6))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    text = windows()
    report = fit_replacements(student, teacher, text, ridge=1e-9, progress=False)
    assert set(report.after) == {2, 3} and report.before[2] == pytest.approx(1.0)
    assert report.after[2] < 0.9 and report.after[3] < report.before[3]
    seen = {}
    attn = teacher.model.layers[2].self_attn
    hooks = [attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", kw["hidden_states"]), with_kwargs=True),
             attn.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out[0]))]
    with torch.no_grad():
        teacher(text)
    for h in hooks:
        h.remove()
    x, y = (seen[k].reshape(-1, seen[k].shape[-1]).double() for k in ("x", "y"))
    expected = torch.linalg.lstsq(x, y).solution.T  # (C, C): y ≈ x @ W.T
    torch.testing.assert_close(student.model.layers[2].self_attn.linear_attn.weight.double(), expected, atol=1e-4,
                               rtol=1e-3)
    kept = student.model.layers[3].mlp.up_proj.weight
    assert kept.shape == (32, 64) and not (kept == 0).all(dim=1).any()  # no silent channel kept
    fitted = {"model.layers.2.self_attn.linear_attn.weight"} | {
        f"model.layers.3.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    for name, value in student.state_dict().items():
        assert (not torch.equal(value, before[name])) == (name in fitted), name


def test_a_student_without_followers_reports_only_what_was_fitted():
    """A linear-attention student has no followers: its calibration names the linear map's fit, and the report has
    no "Followers calibrated … 0.000 → 0.000" line."""
    from echoatt.building.calibrate import calibrate_student
    from echoatt.building.student import StudentSpec
    from echoatt.evaluation.report import student_text
    from echoatt.run.rundir import SharingInfo

    teacher = tiny_teacher()
    student, _ = StudentSpec(plan="linear=3", head_map="identity").build(teacher, None)
    windows = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    fitted = calibrate_student(student, teacher, windows, 1e-2, progress=False)
    assert "error_before" not in fitted and fitted["replaced_error_after"] < fitted["replaced_error_before"]
    info = SharingInfo(identity={"attention_source": list(range(6))}, plan="linear=3", method="copy", head_map=None,
                       lisa=None,
                       parameters={"teacher": 2, "student": 1, "removed": 1, "removed_percent": 50.0},
                       kv_cache_bytes_per_token_bf16={"teacher": 2, "student": 1},
                       calibration={"windows": 4} | fitted, bounds=None)
    text = student_text(info)[0]
    assert "Followers calibrated" not in text and "Linear attention and narrowed FFNs calibrated on 4 windows" in text
