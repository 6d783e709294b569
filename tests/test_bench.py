"""The benchmark's JSON schema and its cost model (never its timings)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_teacher

from echoatt.bench import CANDIDATES, markdown, run_bench
from echoatt.config import BenchConfig
from echoatt.cost_model import bound, forward_cost
from echoatt.plan import SharingPlan
from echoatt.student import build_student


def test_bench_result_schema():
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, SharingPlan.from_k(6, 2)).requires_grad_(False)
    cfg = BenchConfig(prefill="16", decode="2x16", decode_steps=2, train_len=16, repeats=1, warmup=0)
    result = json.loads(json.dumps(run_bench(teacher, student, cfg, torch.device("cpu"))))
    assert [f["figure"] for f in result["figures"]] == ["prefill", "decode", "train_step", "distill_step"]
    for figure in result["figures"]:
        assert set(figure["timings_s"]) == set(CANDIDATES)
        assert all(t["median"] > 0 for t in figure["timings_s"].values())
        for ratio in figure["ratios"].values():
            assert set(ratio) == {"ratio", "bound", "bound_flops", "bound_bytes", "regime", "achieved_over_bound"}
            assert ratio["bound"] > 1.0
    assert result["figures"][1]["kv_cache_bytes_after_prompt"]["student_sdpa"] < \
        result["figures"][1]["kv_cache_bytes_after_prompt"]["teacher_sdpa"]
    kv = result["size"]["kv_cache_bytes_per_token"]
    assert kv["student"] / kv["teacher"] == pytest.approx(1 - 2 / (2 * 6))
    assert "| prefill |" in markdown(result)
    memory = result["figures"][2]["memory"]  # followers keep no Q/K projections' activations for backward
    assert memory["student_sdpa"]["saved_activation_bytes"] < memory["teacher_sdpa"]["saved_activation_bytes"]


def test_cost_model_counts_what_followers_skip():
    teacher = tiny_teacher()
    c = teacher.config
    student = build_student(teacher, SharingPlan.from_k(6, 2))
    B, T = 1, 32
    t, s = forward_cost(c, B, T, 0, False, 4), forward_cost(student.config, B, T, 0, False, 4)
    qk = 2 * B * T * c.hidden_size * (c.num_attention_heads + c.num_key_value_heads) * c.head_dim
    rope = 3 * B * T * (c.num_attention_heads + c.num_key_value_heads) * c.head_dim
    assert t.flops - s.flops == pytest.approx(2 * (qk + rope))  # two followers, fused path
    eager_t, eager_s = forward_cost(c, B, T, 0, True, 4), forward_cost(student.config, B, T, 0, True, 4)
    assert eager_t.flops - eager_s.flops > t.flops - s.flops  # the reuse path also skips QK^T and softmax
    b = bound(c, student.config, B, T, 0, False, False, 4)
    assert b.regime == "flops" and b.value == pytest.approx(t.flops / s.flops)
    assert bound(c, student.config, 8, 1, 512, False, False, 4).regime == "bytes"


def test_cost_model_follows_the_path_and_the_method():
    teacher = tiny_teacher()
    c = teacher.config
    plan = SharingPlan.from_k(6, 2)
    copy = build_student(teacher, plan).config
    lisa = build_student(teacher, plan, method="lisa").config
    B, P, D, Hkv = 4, 64, c.head_dim, c.num_key_value_heads
    t, s = forward_cost(c, B, 1, P, False, 4), forward_cost(copy, B, 1, P, False, 4)
    k_read = B * (P + 1) * Hkv * D * 4
    assert t.bytes - s.bytes > 2 * k_read  # decode takes the reuse path: followers read no K
    copy.reuse_path = "qk"
    assert t.bytes - forward_cost(copy, B, 1, P, False, 4).bytes < 2 * k_read
    lisa_cost = forward_cost(lisa, B, 1, P, False, 4)
    assert s.bytes < lisa_cost.bytes < t.bytes  # LiSA caches rank-r keys, fewer than the teacher's
    assert lisa_cost.flops != s.flops


def test_cost_model_counts_one_gather_per_distinct_head_map():
    """Decode on the reuse path: an identity map reads the leader's P as is; a non-identity map gathers it once per
    block, so a second follower of the same map costs nothing more."""
    teacher = tiny_teacher()
    c = teacher.config
    plan = SharingPlan(6, ((1, 2, 3),))
    swap = [1, 0, 3, 2]

    def decode_bytes(maps) -> float:
        return forward_cost(build_student(teacher, plan, maps).config, 4, 1, 64, False, 4).bytes

    identity = decode_bytes(None)
    gather = 2 * 4 * c.num_attention_heads * 1 * 65 * 4  # read and write (B, H, 1, P + 1) probabilities
    assert decode_bytes([None, None, swap, swap, None, None]) - identity == pytest.approx(gather)
    assert decode_bytes([None, None, swap, [2, 3, 0, 1], None, None]) - identity == pytest.approx(2 * gather)


def test_followers_of_one_map_share_the_gathered_probabilities():
    teacher = tiny_teacher()
    teacher.config._attn_implementation = "eager"
    swap = [1, 0, 3, 2]
    student = build_student(teacher, SharingPlan(6, ((1, 2, 3),)), [None, None, swap, swap, None, None])
    x = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        probs = student(x, output_attentions=True).attentions
    assert probs[2] is probs[3]  # one gather, read by both
    assert torch.equal(probs[2], probs[1][:, swap])
    probs = student(x, output_attentions=True).attentions  # with gradients, each follower gathers its own
    assert probs[2] is not probs[3] and torch.equal(probs[2], probs[3])
