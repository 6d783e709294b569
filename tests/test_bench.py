"""The benchmark's JSON schema and its cost model (never its timings)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import path_tolerance, tiny_teacher

from echoatt.building.student import build_student
from echoatt.evaluation.bench import CANDIDATES, markdown, run_bench
from echoatt.planning import planners
from echoatt.planning.cost_model import bound, forward_cost
from echoatt.planning.plan import SharingPlan
from echoatt.run.config import BenchConfig


def test_bench_result_schema():
    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, planners.from_k(6, 2)).requires_grad_(False)
    cfg = BenchConfig(prefill="16", decode="2x16", decode_steps=2, train_len=16, repeats=1, warmup=0)
    result = json.loads(json.dumps(run_bench(teacher, student, cfg, torch.device("cpu"))))
    assert [f["figure"] for f in result["figures"]] == ["prefill", "decode", "train_step", "distill_step"]
    for figure in result["figures"]:
        assert set(figure["timings_s"]) == set(CANDIDATES)
        assert all(t["median"] > 0 for t in figure["timings_s"].values())
        for ratio in figure["ratios"].values():
            assert set(ratio) == {"ratio", "bound", "bound_flops", "bound_bytes", "regime", "achieved_over_bound"}
            assert ratio["bound"] > 1.0
    decode = result["figures"][1]
    assert decode["kv_cache_bytes_after_prompt"]["student"] < decode["kv_cache_bytes_after_prompt"]["teacher"]
    assert decode["bandwidth_limit_ms"]["student"] < decode["bandwidth_limit_ms"]["teacher"]  # it reads fewer bytes
    assert all(decode["over_bandwidth_limit"][c] > 1 for c in CANDIDATES)  # nothing beats the hardware
    assert result["figures"][3]["kd_output_bytes_per_token_vocab_entry"] is not None and result["not_run"] == []
    kv = result["size"]["kv_cache_bytes_per_token"]
    assert kv["student"] / kv["teacher"] == pytest.approx(1 - 2 / (2 * 6))
    assert "| prefill |" in markdown(result)
    memory = result["figures"][2]["memory"]  # followers keep no Q/K projections' activations for backward
    assert memory["student_sdpa"]["saved_activation_bytes"] < memory["teacher_sdpa"]["saved_activation_bytes"]


def test_cost_model_counts_what_followers_skip():
    teacher = tiny_teacher()
    c = teacher.config
    student = build_student(teacher, planners.from_k(6, 2))
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
    plan = planners.from_k(6, 2)
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


def test_what_does_not_fit_is_reported_and_the_rest_measured(monkeypatch):
    """Eager candidates that run out of memory are left out of their figure (said in the table), a figure whose
    headline runs out is listed as not run, and the bench goes on: never a crash of the whole bench."""
    from echoatt.evaluation import bench

    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, planners.from_k(6, 2)).requires_grad_(False)
    with_impl = bench._with_impl

    def eager_runs_out(model, impl):
        if impl == "eager":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
        return with_impl(model, impl)

    monkeypatch.setattr(bench, "_with_impl", eager_runs_out)
    real_train = bench.train_figure
    monkeypatch.setattr(bench, "train_figure", lambda *a, **kw: real_train(*a, **kw) if not a[-1] else
                        (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    cfg = BenchConfig(prefill="16", decode="2x16", decode_steps=2, train_len=16, repeats=1, warmup=0)
    result = json.loads(json.dumps(run_bench(teacher, student, cfg, torch.device("cpu"))))
    assert [f["figure"] for f in result["figures"]] == ["prefill", "decode", "train_step"]
    for figure in result["figures"]:
        assert set(figure["timings_s"]) == {"teacher_sdpa", "student_sdpa"} and set(figure["ratios"]) == {"headline"}
        assert figure["skipped"] == {"teacher_eager": "out of memory", "student_eager": "out of memory"}
    assert result["not_run"] == [{"figure": "distill_step", "setting": {"batch": 1, "tokens": 16},
                                  "reason": "out of memory"}]
    table = markdown(result)
    assert "(out of memory)" in table and "| distill_step | batch 1, tokens 16 | not run: out of memory |" in table
    monkeypatch.setattr(bench, "_with_impl", lambda model, impl: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # anything else is still an error
        run_bench(teacher, student, cfg, torch.device("cpu"))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decode_from_a_static_cache_gives_the_dynamic_caches_logits(cache):
    """The bench's decode steps from a prompt cache prefilled on SDPA: the static cache (CUDA graphs' kind) gives the
    logits of the dynamic one, for teacher and student, on either backend."""
    from echoatt.evaluation.bench import prompt_cache
    from echoatt.model.modeling_echoatt import CACHE_KWARG

    teacher = tiny_teacher()
    student = build_student(teacher, SharingPlan(6, ((1, 2), (3, 4)), (5,)), [None, None, [1, 0, 3, 2], None,
                                                                           [2, 2, 0, 1], None])
    ids, steps = torch.randint(3, 128, (2, 10)), torch.randint(3, 128, (2, 3))
    def decoded(model, impl: str, kind: str) -> torch.Tensor:
        kv = prompt_cache(model, ids, 13, kind == "static")
        model.config._attn_implementation = impl
        with torch.no_grad():
            return torch.stack([model(input_ids=steps[:, i : i + 1], use_cache=True, **{CACHE_KWARG: kv}).logits[:, -1]
                                for i in range(3)])

    for impl in ("sdpa", "eager"):  # two cache layouts: the teacher's own gap between them sets the tolerance
        tolerance = path_tolerance(decoded(teacher, impl, cache), decoded(teacher, impl, "dynamic"))
        torch.testing.assert_close(decoded(student, impl, cache), decoded(student, impl, "dynamic"), atol=tolerance,
                                   rtol=0)


def test_static_decode_repeats_rewind_the_prompt_cache():
    """Each decode repeat rewinds the prompt's cache (`bench.rewind`): a static cache, which has no `crop` before
    transformers 5.24 (CI runs this test on the oldest transformers declared too), decodes the same logits after a
    rewind, and `bench --decode-cache static` runs its repeats."""
    from echoatt.evaluation.bench import decode_figure, prompt_cache, rewind
    from echoatt.model.modeling_echoatt import CACHE_KWARG

    teacher = tiny_teacher().requires_grad_(False)
    student = build_student(teacher, SharingPlan(6, ((1, 2),), (4,))).requires_grad_(False)
    ids, step = torch.randint(3, 128, (2, 10)), torch.randint(3, 128, (2, 2))
    for model in (teacher, student):
        kv = prompt_cache(model, ids, 12, static=True)
        with torch.no_grad():
            first = model(input_ids=step, use_cache=True, **{CACHE_KWARG: kv}).logits
            rewind(kv, 2)
            assert int(kv.get_seq_length()) == 10
            again = model(input_ids=step, use_cache=True, **{CACHE_KWARG: kv}).logits
        torch.testing.assert_close(again, first, atol=0, rtol=0)
    cfg = BenchConfig(prefill="", decode="2x8", decode_steps=2, train_len=0, repeats=2, warmup=1,
                      decode_cache="static")
    figure = decode_figure(teacher, student, 2, 8, cfg, torch.device("cpu"), 4)
    assert figure["setting"]["cache"] == "static" and len(figure["timings_s"]["student_sdpa"]["values"]) == 2


def test_bench_leaves_the_callers_teacher_as_it_was(tmp_path):
    """`bench` with a loaded teacher (as `run`, `compare` and `echoatt.compress` pass theirs) times it in another
    dtype without casting it: the caller's model keeps its dtype, weights, attention backend, mode and trainable
    flags (a bf16 cast would follow the teacher into every later point of a trade curve)."""
    from echoatt.commands.bench import bench
    from echoatt.inputs.teacher import Teacher

    teacher = tiny_teacher()
    loaded = Teacher.of(teacher)
    teacher.config._attn_implementation = "sdpa"
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    build_student(teacher, SharingPlan(6, ((1, 2),), (4,))).save_pretrained(tmp_path / "student")
    cfg = BenchConfig(out=str(tmp_path / "out"), student=str(tmp_path / "student"), prefill="8", decode="1x8",
                      decode_steps=2, train_len=8, repeats=1, warmup=0, dtype="bfloat16", device="cpu")
    result = bench(cfg, loaded)
    assert result["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in teacher.state_dict().values())
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)
    assert teacher.config._attn_implementation == "sdpa" and all(p.requires_grad for p in teacher.parameters())
    assert teacher.training


def test_the_runs_own_speed_check_times_compiled_static_decode_on_cuda():
    """`run`'s short timing on a GPU decodes from a static cache with compiled steps (eager steps from a dynamic cache
    time launches and the cache's per-step copies there); on a CPU it is the curve's setting."""
    from echoatt.run.results import QUICK_SPEED, quick_speed_settings

    assert quick_speed_settings("cpu") == QUICK_SPEED
    cuda = quick_speed_settings("cuda:1")
    assert cuda["decode_cache"] == "static" and cuda["compile"] and cuda["decode"] == QUICK_SPEED["decode"]
    BenchConfig(**cuda, device="cpu").validate()


def test_the_cost_model_prices_linear_attention_and_each_ffn_width():
    """A linear attention costs one C x C matmul and its weights, nothing cached; each FFN costs its own width (none
    at 0): the bounds the budget planner chooses by."""
    from echoatt.building.student import student_config
    from echoatt.planning.cost_model import attention_cost

    teacher = tiny_teacher()
    C, I, B, T = teacher.config.hidden_size, teacher.config.intermediate_size, 2, 16
    cost = lambda config: forward_cost(config, B, T, 0, False, 2)
    base = cost(teacher.config)
    linear = student_config(teacher.config, SharingPlan.read("linear=2", 6))
    assert attention_cost(linear, 2, B, T, 0, False, 2).flops == 2 * B * T * C * C
    assert base.flops - cost(linear).flops == pytest.approx(
        attention_cost(teacher.config, 2, B, T, 0, False, 2).flops - 2 * B * T * C * C)
    narrow = student_config(teacher.config, SharingPlan.read("ffn=3:32,ffn=4:0", 6))
    assert base.flops - cost(narrow).flops == pytest.approx(3 * 2 * B * T * C * ((I - 32) + I))
    assert base.bytes - cost(narrow).bytes == pytest.approx(3 * C * ((I - 32) + I) * 2)
    decode = bound(teacher.config, linear, B=4, T=1, P=64, teacher_eager=False, student_eager=False, dtype_bytes=2)
    assert decode.bytes > 1  # no K/V read at layer 2


def test_on_a_cpu_with_native_bf16_the_bench_times_bf16_beside_fp32(tmp_path, native_bf16):
    """`--dtype auto` times the precision runs train in — bf16 on such a CPU — and fp32 beside it; on other CPUs
    (the suite's default) fp32 alone."""
    from echoatt.commands.bench import bench, bench_dtypes

    teacher = tiny_teacher()
    build_student(teacher, SharingPlan(6, ((1, 2),), (4,))).save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = BenchConfig(teacher=str(tmp_path / "teacher"), out=str(tmp_path / "out"), student=str(tmp_path / "student"),
                      prefill="8", decode="1x8", decode_steps=2, train_len=0, repeats=1, warmup=0, device="cpu")
    assert bench(cfg)["dtype"] == "bfloat16"
    fp32 = json.loads((tmp_path / "out" / "bench-fp32.json").read_text())
    assert fp32["dtype"] == "float32" and [f["figure"] for f in fp32["figures"]] == ["prefill", "decode"]
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["dtype"] == "bfloat16"
    assert bench_dtypes("float32", torch.device("cpu")) == [torch.float32]


def test_on_a_cpu_without_native_bf16_the_bench_times_fp32():
    from echoatt.commands.bench import bench_dtypes

    assert bench_dtypes("auto", torch.device("cpu")) == [torch.float32]
    assert bench_dtypes("both", torch.device("cpu")) == [torch.bfloat16, torch.float32]
