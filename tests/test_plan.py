"""Sharing plans: construction from k, a threshold, explicit blocks; invalid plans are refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_teacher

from echoatt.planning import planners
from echoatt.planning.plan import Change, PlanError, SharingPlan
from echoatt.planning.planners import similarity_loss

C = Change.read


def test_k2_over_inner_layers_of_30():
    plan = planners.from_k(30, 2)
    assert len(plan.followers) == 14
    assert plan.blocks[0] == (1, 2) and plan.blocks[-1] == (27, 28)
    assert 0 not in plan.followers and 29 not in plan.followers


def test_k3_leaves_a_single_unshared():
    plan = planners.from_k(30, 3)  # inner layers 1..28: nine blocks of 3 and layer 28 alone
    assert len(plan.blocks) == 9 and len(plan.followers) == 18
    assert 28 not in plan.followers + plan.leaders


def test_k_with_first_and_last():
    plan = planners.from_k(6, 2, share_first=True, share_last=True)
    assert plan.blocks == ((0, 1), (2, 3), (4, 5))


def test_attention_source():
    assert SharingPlan(6, ((1, 2, 3),)).attention_source() == [0, 1, 1, 1, 4, 5]


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([[1, 2], [2, 3]], "overlaps"),
        ([[4, 5, 6]], "out of range"),
        ([[3]], "one layer"),
        ([[1, 3]], "consecutive"),
        ([[3, 2]], "consecutive"),
        ([[-1, 0]], "out of range"),
    ],
)
def test_invalid_plans(blocks, message):
    with pytest.raises(PlanError, match=message):
        SharingPlan(6, tuple(tuple(b) for b in blocks))


def test_parse():
    assert planners.parse("k=2", 6).blocks == ((1, 2), (3, 4))
    assert planners.parse("1-2,3-5", 6).blocks == ((1, 2), (3, 4, 5))
    assert planners.parse("none", 6).blocks == ()
    mixed = planners.parse("1-2,drop=4,drop=5", 6)
    assert mixed.blocks == ((1, 2),) and mixed.dropped == (4, 5)
    assert planners.parse(mixed.spec(), 6) == mixed and SharingPlan(6, ()).spec() == "none"
    wide = planners.parse("1-2,drop=3,linear=4,ffn=5:32,ffn=2:0", 6)  # every kind of change: spec reads back
    assert (wide.linear, wide.ffn, wide.spec()) == ((4,), ((2, 0), (5, 32)), "1-2,drop=3,linear=4,ffn=2:0,ffn=5:32")
    assert planners.parse(wide.spec(), 6) == wide and wide.ffn_width(5, 128) == 32 and wide.ffn_width(1, 128) == 128
    for bad, message in (("1-2,linear=2", "overlaps"), ("drop=3,linear=3", "both drop"),
                         ("ffn=2:8,ffn=2:16", "distinct layers"), ("ffn=2", "cannot parse"), ("ffn=2:-1", "0 \\(no FFN")):
        with pytest.raises(PlanError, match=message):
            planners.parse(bad, 6)
    with pytest.raises(PlanError, match="overlaps"):
        planners.parse("1-2,drop=2", 6)
    with pytest.raises(PlanError, match="cannot parse"):
        planners.parse("every other", 6)
    with pytest.raises(PlanError, match="analysis"):
        planners.parse("threshold=0.9", 6)
    with pytest.raises(PlanError, match="at least 2"):
        planners.parse("k=1", 6)


def test_threshold_groups_followers_with_similar_leaders():
    sim = np.full((6, 6), 0.1)
    np.fill_diagonal(sim, 1.0)
    sim[2, 1] = sim[3, 1] = 0.95  # 2 and 3 resemble 1
    sim[3, 2] = 0.99
    sim[5, 4] = 0.99  # 5 is protected (last layer)
    plan = planners.from_threshold(sim, 0.9)
    assert plan.blocks == ((1, 2, 3),)
    assert planners.from_threshold(sim, 0.9, max_block=2).blocks == ((1, 2),)


def test_papers_nine_of_twenty_two():
    plan = planners.parse("k=2,followers=9", 22)
    assert len(plan.followers) == 9 and plan.blocks[-1] == (17, 18)
    assert len(planners.parse("k=3,followers=5", 22).followers) == 5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("k=9", r"k=9 is larger than the 4 layers this 6-layer model can share"),
        ("k=2,frist", r"unknown option 'frist' in plan 'k=2,frist'; a k= plan takes first, last, followers, protect"),
        ("threshold=0.8,mx=3", r"unknown option 'mx=3'"),
        ("3-1", r"block '3-1' must run from a lower to a higher layer \(like 1-3\)"),
        ("k=two", "bad number"),
    ],
)
def test_parse_refuses_what_it_would_otherwise_misread(spec, message):
    with pytest.raises(PlanError, match=message):
        planners.parse(spec, 6, head_matched=np.ones((6, 6)))
    assert planners.parse("k=4", 6).blocks == ((1, 2, 3, 4),)  # the largest k that fits is fine


def test_budget_picks_the_most_alike_followers_that_reach_the_bounds():
    """Blocks are added by least predicted loss per follower (1 − head-matched similarity to what they read) until
    the cost model's bounds reach the targets; `k=2` asks for at least blind k=2's bounds."""
    hm = np.full((8, 8), 0.1)
    for i in (3, 4, 5):
        hm[i, 2] = 0.95  # layers 3-5 attend like layer 2
    bounds = lambda plan: {"prefill": 1 + 0.01 * len(plan.followers), "decode": 1 + 0.02 * len(plan.followers),
                           "kv": 1 - 0.05 * len(plan.followers)}
    plan = planners.parse("budget=k=2,max=4", 8, hm, bounds=bounds)
    assert plan.blocks == ((2, 3, 4, 5),)  # 3 followers, as many as k=2's, and the ones alike
    loss = similarity_loss(hm)
    assert sum(map(loss, plan.changes())) == pytest.approx(3 * 0.05)
    assert sum(map(loss, planners.from_k(8, 2).changes())) > 2.5
    assert planners.parse("budget=k=2", 8, hm, bounds=bounds).blocks[0] == (2, 3, 4)  # blocks of at most 3
    assert len(planners.parse("budget=decode=1.06", 8, hm, bounds=bounds).followers) == 3
    assert len(planners.parse("budget=kv=0.9", 8, hm, bounds=bounds).followers) == 2
    with pytest.raises(PlanError, match="cannot be met"):
        planners.parse("budget=decode=2", 8, hm, bounds=bounds)
    with pytest.raises(PlanError, match="unknown option 'speed'"):
        planners.parse("budget=speed=2", 8, hm, bounds=bounds)
    with pytest.raises(PlanError, match="names no target"):
        planners.parse("budget=protect=2", 8, hm, bounds=bounds)


def test_budget_avoids_the_blocks_measured_to_cost_most():
    """With measured block losses, the budget takes the cheap blocks, however alike the analysis says the others
    are; larger blocks replace the pairs inside them when that costs less per follower."""
    hm = np.full((8, 8), 0.9)
    bounds = lambda plan: {"prefill": 1 + 0.01 * len(plan.followers), "decode": 1, "kv": 1}
    candidates = planners.budget_candidates("budget=prefill=1.03", 8)
    assert {C("1-2"), C("4-6")} <= set(candidates) and not {C("0-1"), C("6-7")} & set(candidates)
    dear = {C("1-2"): 5.0, C("1-3"): 10.0}  # layer 2 must not follow
    loss = lambda block: dear.get(block, 0.1 * len(block.followers))
    plan = planners.parse("budget=prefill=1.03", 8, hm, bounds=bounds, block_loss=loss)
    assert 2 not in plan.followers and len(plan.followers) == 3
    assert sum(map(loss, plan.changes())) == pytest.approx(0.3)


def test_a_move_that_lowers_the_loss_ranks_first_by_how_much_it_lowers_it():
    """With (1,2) and (5,6) chosen, replacing (1,2) by (1,2,3) saves 0.02 for a little progress and by (1,2,3,4) saves
    0.05 for much more: per unit of progress the small saving looks better (-0.2 vs -0.05) and, once taken, meets the
    budget and rules out the large one. Improvements rank first, by how much they improve."""
    a, b, c, d = C("1-2"), C("5-6"), C("1-3"), C("1-4")
    loss = {a: 0.1, b: 0.1, c: 0.08, d: 0.05}.get
    reached = {(): 0, (a,): 1, (b,): 1, (c,): 0.5, (d,): 0.4, (a, b): 2, (c, b): 2.1, (d, b): 3}
    progress = lambda plan: reached[tuple(sorted(plan.changes(), key=lambda x: x not in (a, c, d)))]
    plan = planners.from_budget(10, [a, b, c, d], loss, lambda plan: progress(plan) >= 2.1, progress)
    assert plan.changes() == [d, b] and sum(map(loss, plan.changes())) == pytest.approx(0.15)


def test_progress_never_rewards_a_slower_plan():
    """A target the empty plan meets already (blind k=2 LiSA's prefill bound is below 1) counts for no progress: the
    planner must not pick blocks because they slow prefill down towards it."""
    slow = (3, 4)  # LiSA-like: this block slows prefill, the others speed decode
    bounds = lambda plan: {"prefill": 1 - 0.1 * (slow in plan.blocks), "decode": 1 + 0.05 * len(plan.followers),
                           "kv": 1}
    loss = lambda block: 0.3 if block == slow else 0.2  # dearer: only a reward for slowing prefill would pick it
    plan = planners.parse("budget=decode=1.05,prefill=0.9", 8, None, bounds=bounds, block_loss=loss)
    assert slow not in plan.blocks and len(plan.followers) == 1  # one decode follower, never the slowing block


def test_drop_budget_takes_its_own_ranking():
    """Attention drop's plan is made of dropped attention (one path with a plan's `drop=N`), in its own order."""
    bounds = lambda plan: {"prefill": 1 + 0.01 * len(plan.dropped), "decode": 1, "kv": 1}
    plan = planners.parse("budget=prefill=1.03", 8, None, bounds=bounds, ranking=[0, 5, 7, 2, 3, 6, 1, 4])
    assert plan.dropped == (2, 3, 5) and plan.blocks == ()  # 0, 1 (the first follower-able is 2) and 7 never
    only = planners.parse("budget=prefill=1.03,drop-only", 8, None, bounds=bounds, ranking=[0, 5, 7, 2, 3, 6, 1, 4])
    assert only == plan  # drop-only has no blocks: its drops are what attention drop may take


def test_attention_drop_drops_what_a_plan_would_make_follow():
    """`--method drop` on an explicit plan builds the same student as the plan with those layers' attention
    dropped, and its plan says so."""
    from echoatt.building.student import StudentSpec

    teacher = tiny_teacher()
    student, plan = StudentSpec("1-3,ffn=4:64", method="drop").build(teacher, None)
    assert plan == SharingPlan.read("drop=2,drop=3,ffn=4:64", 6) == SharingPlan.read("1-3,ffn=4:64", 6).dropping_followers()
    same, _ = StudentSpec(plan.spec(), method="copy", head_map="identity").build(teacher, None)
    assert student.config.to_dict() | {"_name_or_path": ""} == same.config.to_dict() | {"_name_or_path": ""}
    for (name, a), (_, b) in zip(student.state_dict().items(), same.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("options", [",linear", ",ffn", ",drop,linear,ffn"])
def test_attention_drop_refuses_by_name_what_it_cannot_plan(options):
    """`--method drop` ranks layers to drop by its own criterion: a budget's `,linear` / `,ffn` were silently left out
    (an FFN candidate's width even landed among the droppable layers); they are refused by name, before any work."""
    from echoatt.building.student import StudentSpec

    with pytest.raises(PlanError, match=r"--method drop drops attention and nothing else.*,(linear|ffn)"):
        StudentSpec(f"budget=decode=1.2{options}", method="drop").check()
    StudentSpec("budget=decode=1.2,drop", method="drop").check()  # what it does plan is still taken


def test_a_mixed_budget_weighs_dropping_attention_against_sharing_it():
    """`drop` adds each layer alone as a candidate (its attention dropped); the greedy takes what buys the most
    speed per unit of measured loss, whichever kind it is."""
    bounds = lambda plan: {"prefill": 1 + 0.01 * len(plan.followers) + 0.03 * len(plan.dropped), "decode": 1, "kv": 1}
    candidates = planners.budget_candidates("budget=prefill=1.06,drop", 8)
    assert C("drop=2") in candidates and not {C("drop=1"), C("drop=7")} & set(candidates)  # as followers: 2..6
    cheap_drops = lambda block: 0.05 if block.kind == "drop" else 0.1 * len(block.followers)
    plan = planners.parse("budget=prefill=1.06,drop", 8, None, bounds=bounds, block_loss=cheap_drops)
    assert plan.blocks == () and len(plan.dropped) == 2
    dear_drops = lambda block: 1.0 if block.kind == "drop" else 0.1 * len(block.followers)
    plan = planners.parse("budget=prefill=1.03,drop", 8, None, bounds=bounds, block_loss=dear_drops)
    assert plan.dropped == () and len(plan.followers) == 3
    assert "attention dropped at [2, 5]" in SharingPlan(8, ((3, 4),), (2, 5)).describe()
    with pytest.raises(PlanError, match="overlaps"):
        SharingPlan(8, ((2, 3),), (3,))
    with pytest.raises(PlanError, match="measured loss"):
        planners.parse("budget=prefill=1.03,drop", 8, np.ones((8, 8)), bounds=bounds)


def test_a_budget_weighs_linear_attention_and_ffn_widths_beside_drops():
    """`,linear` and `,ffn` add each layer's linear attention and its FFN at `ffn_widths` as candidates; the greedy
    takes the cheapest speed whatever its kind, a narrower FFN replacing the wider one of its layer and a drop the
    linear attention of its layer, never two changes of one kind to one layer."""
    candidates = planners.budget_candidates("budget=decode=1.2,drop,linear,ffn", 8, intermediate=256)
    assert C("linear=2") in candidates and not {C("linear=1"), C("linear=7")} & set(candidates)
    assert {c for c in candidates if c.kind == "ffn" and c.first == 1} == {C(f"ffn=1:{w}") for w in (192, 128, 64, 0)}
    assert planners.ffn_widths(1536) == [1152, 768, 384, 0] and planners.ffn_widths(100) == [64, 0]

    def bounds(plan):  # a drop saves 0.05, a linear attention 0.04, an FFN 0.08 x the share of it removed
        ffn = sum(0.08 * (256 - w) / 256 for _, w in plan.ffn)
        return {"decode": 1 + 0.05 * len(plan.dropped) + 0.04 * len(plan.linear) + ffn, "prefill": 1, "kv": 1}

    def loss(c):  # halving an FFN buys speed cheapest; linear attention costs a tenth of a drop
        if c.kind == "ffn":
            return {192: 0.01, 128: 0.015, 64: 0.2, 0: 1.0}[c.width]
        return 0.02 if c.kind == "linear" else (0.2 if c.kind == "drop" else 5.0)

    plan = planners.parse("budget=decode=1.2,drop,linear,ffn", 8, None, bounds=bounds, block_loss=loss,
                          intermediate=256)
    assert plan == SharingPlan(8, (), ffn=tuple((i, 128) for i in range(1, 6)))  # five FFNs halved: 1.2 reached
    dear_ffn = lambda c: 1.0 if c.kind == "ffn" else loss(c)
    plan = planners.parse("budget=decode=1.2,drop,linear,ffn", 8, None, bounds=bounds, block_loss=dear_ffn,
                          intermediate=256)
    assert plan.ffn == () and len(plan.linear) == 5 and bounds(plan)["decode"] >= 1.2  # then linear attention
    twice = lambda c: 0.0 if c == C("linear=2") else (0.001 if c == C("drop=2") else dear_ffn(c))
    plan = planners.parse("budget=decode=1.2,drop,linear,ffn", 8, None, bounds=bounds, block_loss=twice,
                          intermediate=256)
    assert 2 in plan.dropped and 2 not in plan.linear  # the drop replaced layer 2's linear attention
    with pytest.raises(PlanError, match="measured loss"):
        planners.parse("budget=decode=1.2,ffn", 8, np.ones((8, 8)), bounds=bounds, intermediate=256)


def test_a_long_budget_swaps_its_worst_member_where_the_whole_plan_measures_lower(capsys):
    """`,long`: the greedy's plan is measured whole; its worst member (the one whose removal lowers the whole plan's
    loss most) is left out and the budget met again without it, kept only where the whole plan measures lower."""
    bounds = lambda plan: {"prefill": 1 + 0.03 * len(plan.dropped), "decode": 1, "kv": 1}
    alone = lambda c: {C(f"drop={i}"): 0.1 * (i - 1) for i in (2, 3, 4, 5)}.get(c, 1.0)  # the greedy takes 2 and 3
    together = lambda plan: sum(alone(C(f"drop={d}")) for d in plan.dropped) + (5.0 if {2, 3} <= set(plan.dropped)
                                                                               else 0)
    spec = "budget=prefill=1.06,drop,long"
    plan = planners.parse(spec, 8, None, bounds=bounds, block_loss=alone, joint=together)
    assert plan.dropped in ((2, 4), (3, 4))  # one of the pair that costs together swapped for layer 4
    said = capsys.readouterr().out
    assert "whole-plan check: drop=2,drop=3 measures 5.300" in said and "— taken" in said
    assert together(plan) == min(together(SharingPlan(8, (), d)) for d in ((2, 4), (3, 4)))
    plan = planners.parse(spec, 8, None, bounds=bounds, block_loss=alone, joint=lambda p: together(p) - 5.0 * (
        {2, 3} <= set(p.dropped)))  # nothing costs more together: the greedy's plan stays
    assert plan.dropped == (2, 3)
    plan = SharingPlan(8, ((1, 2),), (4,), (5,), ((3, 64),))
    assert plan.changes() == [C("1-2"), C("drop=4"), C("linear=5"), C("ffn=3:64")]
    assert SharingPlan.of(plan.changes()[::-1], 8) == plan and plan.spec() == "1-2,drop=4,linear=5,ffn=3:64"
    with pytest.raises(PlanError, match="whole"):
        planners.parse(spec, 8, None, bounds=bounds, block_loss=alone)
