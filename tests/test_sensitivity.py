"""Measured block losses: each is the student's NLL increase over the teacher with that block alone shared, and
budget plans are chosen by them (and reuse them while nothing they depend on changed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOY, tiny_teacher
from transformers import AutoConfig

from echoatt.building.student import StudentSpec, plan_bounds, student_config
from echoatt.cli import main
from echoatt.evaluation.metrics import repeated_tokens, retrieval
from echoatt.inputs.corpus import REPEAT_SPAN, repeat_spans
from echoatt.planning import planners, search, sensitivity
from echoatt.planning.analysis import Similarity
from echoatt.planning.plan import Change
from echoatt.planning.sensitivity import BlockEffects, measure_block_effects
from echoatt.training.precision import Precision

C = Change.read


def test_block_effects_are_the_kl_from_the_teacher_of_each_block_alone(tmp_path):
    teacher = tiny_teacher()
    text = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    probe = repeated_tokens(2, 8, 128, exclude=[0, 1, 2])
    spec = StudentSpec(plan="k=2", head_map="identity")
    effects = measure_block_effects(teacher, spec, None, [C("1-2"), C("2-4"), C("drop=3")], text, probe, {"a": 1},
                                    progress=False)
    student, _ = StudentSpec(plan="2-4", head_map="identity").build(teacher, None)
    p_t, p_s = (torch.log_softmax(m(input_ids=text).logits[:, :-1].double(), -1) for m in (teacher, student))
    kl = (p_t.exp() * (p_t - p_s)).sum(-1).mean().item()  # (N, T-1) positions, every one predicted
    assert effects.blocks[C("2-4")]["text"] == pytest.approx(kl, rel=1e-4)
    q_t, q_s = (torch.log_softmax(m(input_ids=probe).logits[:, 8:-1].double(), -1) for m in (teacher, student))
    assert effects.blocks[C("2-4")]["retrieval"] == pytest.approx((q_t.exp() * (q_t - q_s)).sum(-1).mean().item(),
                                                                   rel=1e-4)  # the repeated half only
    assert effects.teacher["retrieval"] == pytest.approx(retrieval(teacher, probe)["nll"])
    dropped, _ = StudentSpec(plan="2-3", method="drop").build(teacher, None)  # a candidate of one layer: dropped
    d_s = torch.log_softmax(dropped(input_ids=text).logits[:, :-1].double(), -1)
    assert effects.blocks[C("drop=3")]["text"] == pytest.approx((p_t.exp() * (p_t - d_s)).sum(-1).mean().item(), rel=1e-4)
    assert "drop=3" in effects.summary()
    assert effects.loss(C("1-2")) == pytest.approx(sum(effects.blocks[C("1-2")].values()))
    effects.save(tmp_path / "e.json")
    back = BlockEffects.load(tmp_path / "e.json")
    assert back.blocks == effects.blocks and back.known({"a": 1}) == effects.blocks
    assert back.known({"a": 2}) == {}
    assert "cheapest" in effects.summary()
    fast = measure_block_effects(teacher, spec, None, [C("1-2"), C("2-4"), C("drop=3")], text, probe, {"a": 1},
                                 progress=False, precision=Precision(True, "test"))
    for block, terms in effects.blocks.items():  # bf16 matmuls: the same measurement, to bf16's precision
        assert fast.blocks[block] == pytest.approx(terms, rel=0.1, abs=1e-3), block
    assert fast.blocks != effects.blocks  # ...and measured in bf16


def test_replacement_candidates_are_measured_fitted_from_their_layer_up(tmp_path):
    """A linear attention or a narrowed FFN is measured as `share` will build it — fitted in closed form on other text
    — and run from its own layer up on the teacher's hidden states there: the same KL as the whole fitted student's."""
    from echoatt.building.calibrate import apply_fits, replacement_stats
    from echoatt.building.student import build_student
    from echoatt.planning.plan import SharingPlan

    teacher = tiny_teacher()
    text = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    other = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    probe = repeated_tokens(2, 8, 128, exclude=[0, 1, 2])
    stats = replacement_stats(teacher, other, [3], {2: 64}, progress=False)
    fits = lambda student: apply_fits(student, teacher, stats)
    spec = StudentSpec(plan="k=2", head_map="identity")
    effects = measure_block_effects(teacher, spec, None, [C("linear=3"), C("ffn=2:64")], text, probe, {},
                                    progress=False, fits=fits)
    p_t = torch.log_softmax(teacher(input_ids=text).logits[:, :-1].double(), -1)
    for candidate, plan in ((C("linear=3"), "linear=3"), (C("ffn=2:64"), "ffn=2:64")):
        student = build_student(teacher, SharingPlan.read(plan, 6))
        fits(student)
        p_s = torch.log_softmax(student(input_ids=text).logits[:, :-1].double(), -1)
        assert effects.blocks[candidate]["text"] == pytest.approx((p_t.exp() * (p_t - p_s)).sum(-1).mean().item(),
                                                                  rel=1e-4)
        assert effects.blocks[candidate]["text"] > 0
    effects.save(tmp_path / "e.json")
    assert BlockEffects.load(tmp_path / "e.json").blocks == effects.blocks  # saved as linear=3, ffn=2:64
    assert "ffn=2:64" in (tmp_path / "e.json").read_text()


def test_retrieval_scores_the_repeated_half_only():
    teacher = tiny_teacher()
    probe = repeated_tokens(2, 8, 128)
    logits = teacher(input_ids=probe).logits[:, 8:-1]
    target = probe[:, 9:]
    got = retrieval(teacher, probe)
    assert got["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target).item(), 1e-5)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == target).float().mean().item())


def test_budget_share_measures_blocks_once(teacher_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["share", "--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32", "--out", str(out),
            "--plan", "budget=prefill=1.01", "--calibrate", "0", *TOY]
    assert main(args) == 0
    effects = json.loads((out / "block_effects.json").read_text())
    assert set(effects["blocks"]) == {"1-2", "2-3", "3-4", "1-3", "2-4"}  # 6 layers: first and last kept
    assert json.loads((out / "similarity.json").read_text())["induction"] is not None
    sharing = json.loads((out / "student" / "sharing.json").read_text())
    config, similarity = AutoConfig.from_pretrained(teacher_dir), Similarity.load(out / "similarity.json")

    def per_progress(name: str) -> float:  # the planner's first choice: measured loss per share of the way to 1.01
        plan = planners.parse(name, 6)
        bounds = plan_bounds(config, student_config(config, plan, StudentSpec().head_maps(config, plan, similarity)))
        return sum(effects["blocks"][name].values()) / min((bounds["prefill"] - 1) / 0.01, 1.0)

    assert bounds_met(sharing, "prefill", 1.01) and sharing["plan"] == min(effects["blocks"], key=per_progress)
    monkeypatch.setattr(search, "measure_block_effects", lambda *a, **k: pytest.fail("measured again"))
    assert main(args + ["--overwrite"]) == 0
    assert "measured loss of sharing each block" in capsys.readouterr().out
    assert sensitivity.BlockEffects.load(out / "block_effects.json").blocks.keys() == set(map(C, effects["blocks"]))
    older = out / "older.json"  # files written before `drop=N` named a dropped layer's candidate `N-N`
    older.write_text(json.dumps({"teacher": {}, "blocks": {"3-3": {"text": 0.1}, "1-2": {"text": 0.2}}, "settings": {}}))
    assert set(sensitivity.BlockEffects.load(older).blocks) == {C("drop=3"), C("1-2")}


def bounds_met(sharing: dict, metric: str, target: float) -> bool:
    return sharing["bounds"][metric] >= target - 1e-9


def budget_share(teacher_dir, corpus_dir, tmp_path, monkeypatch) -> tuple[list[str], list[str]]:
    """The options every command of these tests shares (OUT: tmp_path/run), and a budget `share` of the tiny teacher."""
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path / "cache"))
    base = ["--teacher", str(teacher_dir), "--corpus", str(corpus_dir), "--seq-len", "32", "--out", str(tmp_path / "run")]
    return base, ["share", *base, "--plan", "budget=prefill=1.01", "--calibrate", "0", "--overwrite", *TOY]


def test_block_effects_are_measured_again_when_what_they_depend_on_changes(teacher_dir, corpus_dir, tmp_path,
                                                                           monkeypatch):
    """Re-analysed with more text (other head maps), or the teacher's weights rewritten at the same path, or the
    corpus read in another encoding: the block losses kept in the run folder no longer apply."""
    import os

    base, share = budget_share(teacher_dir, corpus_dir, tmp_path, monkeypatch)
    measured = []
    real = search.measure_block_effects
    monkeypatch.setattr(search, "measure_block_effects", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main(["analyze", *base, "--num-sequences", "2"]) == 0 and main(share) == 0
    assert main(share) == 0 and len(measured) == 1  # nothing changed: reused
    assert main(["analyze", *base, "--num-sequences", "6"]) == 0 and main(share) == 0
    assert len(measured) == 2  # other head maps
    weights = teacher_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the teacher rewritten in place
    assert main(share) == 0 and len(measured) == 3
    assert main([*share, "--encoding", "latin-1"]) == 0 and len(measured) == 4
    monkeypatch.setattr("echoatt.training.precision.cpu_bf16_feature", lambda: "AVX512-BF16")
    assert main([*share, "--encoding", "latin-1", "--bf16", "no"]) == 0 and len(measured) == 4  # fp32, as kept
    assert main([*share, "--encoding", "latin-1"]) == 0 and len(measured) == 5  # measured in bf16: kept apart


def test_blocks_measured_after_a_local_repair_are_kept_apart(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    """`--repair-blocks N`: each candidate is repaired N steps before its KL is measured, and those effects are kept
    under their own settings (the unrepaired ones are measured again). Whether repair ranks blocks better is a
    question for a real teacher (docs/trade-curve.md), not for a random one."""
    out = tmp_path / "run"
    _, share = budget_share(teacher_dir, corpus_dir, tmp_path, monkeypatch)
    repaired = []
    real = search.repair_briefly
    monkeypatch.setattr(search, "repair_briefly", lambda *a, **k: repaired.append(a[3]) or real(*a, **k))
    assert main([*share, "--repair-blocks", "6"]) == 0
    after = BlockEffects.load(out / "block_effects.json")
    assert after.settings["repair_steps"] == 6 and repaired == [6] * len(after.blocks)
    assert main(share) == 0
    before = BlockEffects.load(out / "block_effects.json")
    assert "repair_steps" not in before.settings and before.blocks.keys() == after.blocks.keys()
    assert all(after.loss(b) != before.loss(b) for b in after.blocks)  # each measured on its repaired student


def test_a_brief_repair_trains_only_the_changed_layers_and_the_next():
    from echoatt.building.repair import repair_briefly

    teacher = tiny_teacher()
    student, _ = StudentSpec(plan="2-3", method="drop").build(teacher, None)  # layer 3's attention dropped
    before = {n: p.clone() for n, p in student.named_parameters()}
    repair_briefly(student, teacher, torch.randint(3, 128, (4, 24)), steps=2)
    moved = {int(n.split(".")[2]) for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {3, 4} and not any(p.requires_grad for p in student.parameters())


def test_long_range_labels_keep_only_tokens_last_seen_far_back():
    from echoatt.planning.sensitivity import long_range_labels

    windows = torch.tensor([[5, 6, 7, 5, 6, 9, 9, 5], [1, 2, 3, 4, 5, 6, 7, 1]])
    got = long_range_labels(windows, distance=3)
    ignore = -100
    # row 0: 5 at 3 (last at 0: 3 back), 6 at 4 (3 back) and 5 at 7 (4 back) count; 9 at 6 (1 back) does not
    assert got[0].tolist() == [ignore, ignore, ignore, 5, 6, ignore, ignore, 5]
    assert got[1].tolist() == [ignore] * 7 + [1]  # first occurrences never count


def test_a_long_budget_scores_long_range_predictions_and_checks_the_plan_whole(teacher_dir, corpus_dir, tmp_path,
                                                                                monkeypatch):
    """`budget=...,long`: each candidate also carries the KL at long-range predictions of other windows (kept under
    their own settings), and the chosen plan is measured whole before it is built."""
    from echoatt.planning.sensitivity import long_range_labels

    teacher = tiny_teacher()
    text = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    long = torch.randint(3, 128, (2, 160), generator=torch.Generator().manual_seed(1))
    probe = repeated_tokens(2, 8, 128, exclude=[0, 1, 2])
    spec = StudentSpec(plan="k=2", head_map="identity")
    effects = measure_block_effects(teacher, spec, None, [C("drop=3")], text, probe, {}, progress=False, long=long)
    dropped, _ = StudentSpec(plan="2-3", method="drop").build(teacher, None)
    labels = long_range_labels(long)
    counted = labels[:, 1:] != -100
    p_t, p_s = (torch.log_softmax(m(input_ids=long).logits[:, :-1].double(), -1) for m in (teacher, dropped))
    kl = ((p_t.exp() * (p_t - p_s)).sum(-1) * counted).sum() / counted.sum()
    assert counted.sum() > 10 and effects.blocks[C("drop=3")]["long"] == pytest.approx(kl.item(), rel=1e-4)
    assert effects.loss(C("drop=3")) == pytest.approx(sum(effects.blocks[C("drop=3")].values()))
    from echoatt.planning.plan import SharingPlan

    joint = sensitivity.joint_loss(teacher, spec, None, sensitivity.effect_inputs(text, probe, long))
    assert joint(SharingPlan(6, (), (3,))) == pytest.approx(effects.loss(C("drop=3")), rel=1e-4)  # a plan of one member
    assert joint(SharingPlan(6, (), (2, 3))) > joint(SharingPlan(6, (), (3,)))

    _, share = budget_share(teacher_dir, corpus_dir, tmp_path, monkeypatch)
    share[share.index("budget=prefill=1.01")] = "budget=prefill=1.01,drop,long"
    joint = []

    def counted_joint_loss(*args, **kwargs):
        measure = sensitivity.joint_loss(*args, **kwargs)
        return lambda plan: joint.append(plan) or measure(plan)

    monkeypatch.setattr(search, "joint_loss", counted_joint_loss)
    assert main(share) == 0
    kept = BlockEffects.load(tmp_path / "run" / "block_effects.json")
    assert kept.settings["long"] == [search.EFFECT_LONG_WINDOWS, sensitivity.LONG_RANGE]
    assert all("long" in v for v in kept.blocks.values()) and joint


def test_reading_labels_keep_only_the_predictions_of_copied_tokens():
    windows = torch.arange(40).view(2, 20)
    copied, reads = repeat_spans(windows, seed=0, span=5)
    labels = sensitivity.reading_labels(copied, reads)
    assert labels.shape == copied.shape and (labels[:, :11] == -100).all()  # the first half and a copy's first token
    kept = labels != -100
    assert kept[:, 1:].equal(reads) and torch.equal(labels[kept], copied[kept])


def test_a_read_budget_charges_each_candidate_for_reading_copies_of_the_training_text(teacher_dir, corpus_dir,
                                                                                      tmp_path, monkeypatch):
    """`budget=...,read`: each candidate also carries the KL at the predictions that read a copy of the training
    text (kept under their own settings), computed as the formula says; a copy-reading layer's drop costs there."""
    teacher = tiny_teacher()
    text = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    reading = repeat_spans(windows, seed=0, span=8)
    probe = repeated_tokens(2, 8, 128, exclude=[0, 1, 2])
    spec = StudentSpec(plan="k=2", head_map="identity")
    effects = measure_block_effects(teacher, spec, None, [C("drop=3")], text, probe, {}, progress=False, reading=reading)
    dropped, _ = StudentSpec(plan="2-3", method="drop").build(teacher, None)
    counted = reading[1]
    p_t, p_s = (torch.log_softmax(m(input_ids=reading[0]).logits[:, :-1].double(), -1) for m in (teacher, dropped))
    kl = ((p_t.exp() * (p_t - p_s)).sum(-1) * counted).sum() / counted.sum()
    assert counted.sum() > 20 and effects.blocks[C("drop=3")]["reading"] == pytest.approx(kl.item(), rel=1e-4)
    assert effects.blocks[C("drop=3")]["reading"] > 0

    _, share = budget_share(teacher_dir, corpus_dir, tmp_path, monkeypatch)
    share[share.index("budget=prefill=1.01")] = "budget=prefill=1.01,drop,read"
    assert main([*share, "--seq-len", "80"]) == 0  # windows whose halves hold a span of 32
    kept = BlockEffects.load(tmp_path / "run" / "block_effects.json")
    assert kept.settings["read"] == [search.EFFECT_READ_WINDOWS, REPEAT_SPAN]
    assert all("reading" in v for v in kept.blocks.values())
