"""The student model: exactness, both reuse paths, the KV cache, padding, save/load."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import QK_PARTS, attention_parameters, path_tolerance, tiny_teacher
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from echoatt.building.student import build_student, kv_cache_bytes_per_token, parameter_report
from echoatt.evaluation.bench import saved_activation_bytes
from echoatt.model.configuration_echoatt import EchoAttConfig
from echoatt.model.modeling_echoatt import CACHE_KWARG, Handoff, output_cache
from echoatt.planning.plan import SharingPlan
from echoatt.training.distill import set_checkpointing

HEAD_MAPS = [None, None, [1, 0, 3, 2], None, [2, 2, 0, 1], None]  # non-trivial maps across KV groups


def student_of(teacher, blocks=((1, 2), (3, 4)), head_map=HEAD_MAPS, impl="sdpa", path="auto", method="copy"):
    teacher.config._attn_implementation = impl
    plan = SharingPlan(teacher.config.num_hidden_layers, tuple(tuple(b) for b in blocks))
    student = build_student(teacher, plan, head_map if blocks else None, method=method)
    student.config.reuse_path = path
    return student


def ids(batch=2, length=12, vocab=128, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def teacher_logits(teacher, impl: str, x: torch.Tensor, **kw) -> torch.Tensor:
    """The teacher's logits under one attention implementation: the reference for a student's two paths."""
    teacher.config._attn_implementation = impl
    with torch.no_grad():
        return teacher(x, **kw).logits


def cached_steps(model, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """Last-position logits of a decode loop over x[:, prompt:] after a cached prefill of x[:, :prompt]: (T, B, V)."""
    with torch.no_grad():
        cache = output_cache(model(x[:, :prompt], use_cache=True))
        steps = []
        for t in range(prompt, x.shape[1]):
            out = model(x[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
            cache = output_cache(out)
            steps.append(out.logits[:, -1])
    assert cache.get_seq_length() == x.shape[1]
    return torch.stack(steps)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_empty_plan_equals_teacher_exactly(teacher, impl):
    student = student_of(teacher, blocks=(), impl=impl)
    x = ids()
    with torch.no_grad():
        assert torch.equal(student(x).logits, teacher(x).logits)


def test_followers_have_no_query_key_projections(teacher):
    student = student_of(teacher)
    for layer, block in enumerate(student.model.layers):
        follower = layer in (2, 4)
        assert hasattr(block.self_attn, "q_proj") != follower
        assert hasattr(block.self_attn, "k_proj") != follower
    for name in ("q_norm", "k_norm"):  # Qwen3's q/k norms go with the projections they normalise
        assert hasattr(student.model.layers[1].self_attn, name) == hasattr(teacher.model.layers[1].self_attn, name)
        assert not hasattr(student.model.layers[2].self_attn, name)
    report = parameter_report(teacher, student)
    assert report["removed"] == sum(attention_parameters(teacher, i, QK_PARTS) for i in (2, 4))
    assert report["removed"] >= 2 * 64 * (4 + 2) * student.config.head_dim  # and the q/k projections are among them


def test_follower_reuses_mapped_leader_heads(teacher):
    """A follower's output is its own V and O applied to the leader's probabilities, head-mapped."""
    student = student_of(teacher, blocks=((1, 2),), impl="eager")
    seen = {}
    student.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("probs", out[1]))
    student.model.layers[2].self_attn.register_forward_pre_hook(
        lambda m, a, kw: None if "hidden" in seen else seen.update(hidden=kw["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        student(ids(batch=1))
        attn = student.model.layers[2].self_attn
        got, _ = attn(seen["hidden"], attention_handoff={1: Handoff(probs=seen["probs"])})
        d = attn.head_dim
        v = attn.v_proj(seen["hidden"]).view(1, 12, 2, d).transpose(1, 2).repeat_interleave(2, dim=1)  # (B,H,T,D)
        probs = seen["probs"][:, HEAD_MAPS[2]]  # (B, H, T, T)
        expected = attn.o_proj((probs @ v).transpose(1, 2).reshape(1, 12, 4 * d))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("path", ["probs", "qk"])
def test_eager_and_fused_paths_agree(teacher, path):
    x = ids()
    tolerance = path_tolerance(teacher_logits(teacher, "eager", x), teacher_logits(teacher, "sdpa", x))
    with torch.no_grad():
        eager = student_of(teacher, impl="eager")(x).logits
        fused = student_of(teacher, impl="sdpa", path=path)(x).logits
    torch.testing.assert_close(eager, fused, atol=tolerance, rtol=0)
    assert not torch.allclose(eager, teacher(x).logits, atol=1e-3)  # sharing really changed something
    layers = student_of(teacher).model.layers  # [1,0,3,2] stays within KV groups (GQA kept), [2,2,0,1] does not
    assert layers[2].self_attn.group_aligned and layers[2].self_attn.num_key_value_groups == 2
    assert not layers[4].self_attn.group_aligned and layers[4].self_attn.num_key_value_groups == 1


def test_path_tolerances_stay_far_below_a_broken_follower(teacher):
    """The tolerances the cross-path tests derive from the teacher (`conftest.path_tolerance`) still catch a broken
    student: a follower reading a wrong leader head moves the logits by far more than any of them."""
    x = ids()
    tolerances = [
        path_tolerance(teacher_logits(teacher, "eager", x), teacher_logits(teacher, "sdpa", x)),
        path_tolerance(cached_steps(teacher, x, 8), teacher_logits(teacher, "sdpa", x)[:, 8:].transpose(0, 1)),
    ]
    wrong = [None, None, [1, 0, 3, 3], None, [2, 2, 0, 1], None]  # follower 2's last head reads the wrong one
    with torch.no_grad():
        right, broken = (student_of(teacher, head_map=maps)(x).logits for maps in (HEAD_MAPS, wrong))
    assert (right - broken).abs().max().item() > 10 * max(tolerances)


@pytest.mark.parametrize(("impl", "path"), [("eager", "auto"), ("sdpa", "auto"), ("sdpa", "qk"), ("sdpa", "probs")])
def test_generate_with_cache_matches_cache_free(teacher, impl, path):
    student = student_of(teacher, impl=impl, path=path)
    x = ids(batch=1, length=6)
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    cached = student.generate(x, use_cache=True, **kw)
    uncached = student.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    seq = cached.clone()  # and each greedy token is the argmax of a full cache-free forward
    with torch.no_grad():
        for t in range(x.shape[1], seq.shape[1]):
            assert student(seq[:, :t], use_cache=False).logits[0, -1].argmax() == seq[0, t]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["teacher", "mixed", "lisa"])  # mixed: a copy follower and dropped layers
def test_static_cache_generation_equals_the_dynamic_cache(teacher, impl, kind):
    """`generate(cache_implementation="static")` (preallocated K/V, what CUDA graphs need) gives the tokens of the
    dynamic cache, for the teacher and every student kind: followers' zero-width key slots and dropped layers' empty
    ones preallocate nothing, and a materialised leader masks the static cache's empty slots as SDPA does."""
    teacher.config._attn_implementation = impl
    plans = {"mixed": (SharingPlan(6, ((2, 3),), (1, 4)), [None, None, None, [1, 0, 3, 2], None, None], "copy"),
             "lisa": (SharingPlan(6, ((1, 2), (3, 4))), HEAD_MAPS, "lisa")}
    model = teacher if kind == "teacher" else build_student(teacher, plans[kind][0], plans[kind][1], plans[kind][2])
    x = ids(batch=2, length=6)
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    assert torch.equal(model.generate(x, cache_implementation="static", **kw), model.generate(x, **kw))


def test_cache_passed_under_the_installed_keyword_is_used(teacher):
    """`CACHE_KWARG` names a parameter of Llama's forward, and a decode loop that hands the cache back under it gives
    the logits of one cache-free forward (a cache passed under a stale name is dropped silently: transformers 5.24)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    assert CACHE_KWARG in inspect.signature(LlamaModel.forward).parameters
    x = ids(batch=1, length=10)
    teacher_full = teacher_logits(teacher, "sdpa", x)[0, 6:]
    reference = path_tolerance(cached_steps(teacher, x, 6)[:, 0], teacher_full)
    student = student_of(teacher)
    with torch.no_grad():
        full = student(x, use_cache=False).logits[0, 6:]
    torch.testing.assert_close(cached_steps(student, x, 6)[:, 0], full, atol=reference, rtol=0)


def test_cache_update_gets_the_call_kwargs_as_in_llama(teacher):
    """Every attention layer hands the call's kwargs to `cache.update`, as Llama does (paged caches need them)."""
    from transformers import DynamicCache

    seen = []

    class Recording(DynamicCache):
        def update(self, key, value, layer_idx, *args, **kwargs):
            seen.append((layer_idx, "kwargs" in kwargs))
            return super().update(key, value, layer_idx, *args, **kwargs)

    student = student_of(teacher, blocks=((1, 2),))
    with torch.no_grad():
        student(ids(), use_cache=True, **{CACHE_KWARG: Recording(config=student.config)})
    assert seen == [(layer, True) for layer in range(6)]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_leaders_handoff_is_freed_after_its_last_follower_in_inference(teacher, impl):
    """In inference the last follower of a leader takes the leader's attention out of the handoff, so its
    (B, H, T, T) probabilities do not live to the end of the forward; with gradients they stay (autograd keeps them
    anyway, and a checkpointed follower recomputed in backward reads them again)."""
    student = student_of(teacher, impl=impl)  # blocks (1, 2) and (3, 4)
    seen = []
    student.model.layers[5].register_forward_pre_hook(
        lambda m, a, kw: seen.append(sorted(kw["attention_handoff"])), with_kwargs=True)
    with torch.no_grad():
        student(ids())
    student(ids())
    assert seen == [[], [1, 3]]


def test_followers_cache_holds_no_keys(teacher):
    student = student_of(teacher)
    with torch.no_grad():
        cache = output_cache(student(ids(), use_cache=True))
    for layer in range(6):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        d = student.config.head_dim
        assert values.shape == (2, 2, 12, d)
        assert keys.numel() == (0 if layer in (2, 4) else 2 * 2 * 12 * d)
    total = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    assert total == kv_cache_bytes_per_token(student.config, dtype_bytes=4) * 2 * 12
    assert cache.get_seq_length() == 12


@pytest.mark.parametrize(("impl", "path"), [("eager", "auto"), ("sdpa", "qk"), ("sdpa", "probs")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(teacher, impl, path, side):
    student = student_of(teacher, impl=impl, path=path)
    short = ids(batch=1, length=7, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([ids(batch=1, length=12, seed=4), torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)])
    mask = torch.ones_like(batch)
    real = slice(5, 12) if side == "left" else slice(0, 7)
    mask[1] = 0
    mask[1, real] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    padding = {"attention_mask": mask, "position_ids": position_ids}
    tolerance = path_tolerance(teacher_logits(teacher, impl, short)[0],
                               teacher_logits(teacher, impl, batch, **padding)[1, real])
    with torch.no_grad():
        alone = student(short).logits[0]
        padded = student(batch, **padding).logits[1, real]
    torch.testing.assert_close(padded, alone, atol=tolerance, rtol=0)


def test_save_load_round_trip(teacher, tmp_path):
    student = student_of(teacher)
    student.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for layer in (2, 4):
        assert f"model.layers.{layer}.self_attn.q_proj.weight" not in keys
        assert f"model.layers.{layer}.self_attn.k_proj.weight" not in keys
        assert f"model.layers.{layer}.self_attn.v_proj.weight" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "EchoAttForCausalLM"
    assert loaded.config.head_map == HEAD_MAPS
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)


@pytest.mark.parametrize(
    "source, head_map, message",
    [
        ([0, 1, 1, 2, 4, 5], None, "not an earlier leader"),  # 3 follows a follower
        ([0, 1, 3, 3, 4, 5], None, "not an earlier leader"),  # 2 follows a later layer
        ([0, 1, 1, 3, 4, 5], [None, None, [0, 1, 2, 9], None, None, None], "head indices"),
    ],
)
def test_config_rejects_bad_sharing(source, head_map, message):
    from conftest import tiny_config

    base = tiny_config().to_dict()
    base = {k: v for k, v in base.items() if k in EchoAttConfig.__dataclass_fields__ and k not in ("model_type",)}
    EchoAttConfig(**base, attention_source=[0, 1, 2, 3, 3, 3])  # valid: 4 and 5 follow leader 3
    with pytest.raises(ValueError, match=message):
        EchoAttConfig(**base, attention_source=source, head_map=head_map)


def test_attention_drop_baseline_removes_the_sub_layer(teacher):
    plan = SharingPlan(6, ((1, 2), (3, 4)))
    dropped = build_student(teacher, plan, method="drop")
    for layer in (2, 4):
        assert not any(True for _ in dropped.model.layers[layer].self_attn.parameters())
    silenced = student_of(teacher, blocks=())  # the teacher with those attention outputs zeroed is the same model
    with torch.no_grad():
        for layer in (2, 4):
            o_proj = silenced.model.layers[layer].self_attn.o_proj
            o_proj.weight.zero_()
            if o_proj.bias is not None:
                o_proj.bias.zero_()
        x = ids()
        torch.testing.assert_close(dropped(x).logits, silenced(x).logits)
        cache = output_cache(dropped(x, use_cache=True))
    assert cache.layers[2].keys.numel() == cache.layers[2].values.numel() == 0
    assert cache.get_seq_length() == 12
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    assert torch.equal(dropped.generate(x[:1], use_cache=True, **kw), dropped.generate(x[:1], use_cache=False, **kw))
    per_layer = teacher.config.num_key_value_heads * dropped.config.head_dim * 2
    assert kv_cache_bytes_per_token(dropped.config) == kv_cache_bytes_per_token(teacher.config) - 2 * 2 * per_layer
    assert kv_cache_bytes_per_token(dropped.config) == per_layer * (12 - 4)
    assert parameter_report(teacher, dropped)["removed"] == sum(attention_parameters(teacher, i) for i in (2, 4))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gradient_checkpointing_gives_the_same_gradients(teacher, impl):
    """The leader's handoff crosses checkpointed layers; recomputation must not change any gradient."""
    x = ids()
    grads, kept = [], []
    for checkpointing in (False, True):
        student = student_of(teacher, impl=impl).train()
        set_checkpointing(student, checkpointing)
        kept.append(saved_activation_bytes(lambda s=student: s(x, labels=x).loss, student))
        student(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert kept[1] < kept[0] / 2  # checkpointing is really on: far fewer activations kept for backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    assert grads[0]["model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0  # followers' loss reaches the leader


@pytest.mark.parametrize("path", ["probs", "qk"])
def test_gradcheck_follower_attention(teacher, path):
    """Analytic gradients of a follower (both reuse paths) match finite differences in float64, with respect to its
    input and to what the leader handed over (the model's RMSNorm and softmax run in float32, so the whole model
    cannot be gradchecked)."""
    attn = student_of(teacher.double(), impl="sdpa").model.layers[2].self_attn
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 4, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    if path == "probs":
        scores = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=gen).masked_fill(torch.ones(4, 4).triu(1).bool(), -1e9)
        lead = (torch.softmax(scores, -1).requires_grad_(),)
        run = lambda h, p: attn(h, attention_handoff={1: Handoff(probs=p)})[0]
    else:
        lead = tuple(torch.randn(1, n, 4, 16, dtype=torch.float64, generator=gen, requires_grad=True) for n in (4, 2))
        run = lambda h, q, k: attn(h, attention_handoff={1: Handoff(query=q, key=k)})[0]
    assert torch.autograd.gradcheck(run, (hidden, *lead), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_mixed_student_shares_and_drops_and_generates_with_a_cache(teacher, impl, tmp_path):
    """A plan with a shared block and dropped layers: the roles are what the plan says, it reloads, and cached
    generation equals cache-free generation."""
    from echoatt.building.student import build_student

    plan = SharingPlan(6, ((2, 3),), (1, 4))
    student = build_student(teacher, plan, [None, None, None, [1, 0, 3, 2], None, None])
    assert [student.config.role(i) for i in range(6)] == ["ordinary", "dropped", "leader", "copy", "dropped",
                                                          "ordinary"]
    student.save_pretrained(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
    x = ids(batch=1, length=6)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    assert torch.equal(student.generate(x, use_cache=True, **kw), student.generate(x, use_cache=False, **kw))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_student_of_every_kind_of_change_reloads_and_generates_with_either_cache(teacher, impl, tmp_path):
    """Beyond attention (Puzzle's choices): linear attention, a narrowed FFN and an FFN-free layer beside a follower and
    a dropped layer — the roles and widths the plan says, nothing cached where attention is gone, and generation with
    a dynamic and a static cache equals cache-free generation after a save and reload."""
    plan = SharingPlan.read("1-2,drop=3,linear=4,ffn=2:64,ffn=5:0", 6)
    student = build_student(teacher, plan)
    torch.nn.init.normal_(student.model.layers[4].self_attn.linear_attn.weight, std=0.05)
    assert [student.config.role(i) for i in range(6)] == ["ordinary", "leader", "copy", "dropped", "linear",
                                                          "ordinary"]
    assert [student.config.ffn_width(i) for i in range(6)] == [128, 128, 64, 128, 128, 0]
    assert student.model.layers[2].mlp.down_proj.weight.shape == (64, 64) and not list(
        student.model.layers[5].mlp.parameters())
    layer = kv_cache_bytes_per_token(teacher.config) // 6  # K and V of one layer
    assert kv_cache_bytes_per_token(student.config) == 3 * layer + layer // 2  # 0, 1, 5 whole; the follower's V
    student.save_pretrained(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
    x = ids(batch=1, length=6)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    free = student.generate(x, use_cache=False, **kw)
    assert torch.equal(student.generate(x, use_cache=True, **kw), free)
    assert torch.equal(student.generate(x, cache_implementation="static", **kw), free)


def test_a_full_width_ffn_and_an_empty_plan_are_the_teacher(teacher):
    """A plan naming an FFN at the teacher's own width changes nothing; narrowing keeps the teacher's channels."""
    x = ids()
    same = build_student(teacher, SharingPlan.read(f"ffn=3:{teacher.config.intermediate_size}", 6))
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, teacher(x).logits, atol=0, rtol=0)
    narrow = build_student(teacher, SharingPlan.read("ffn=3:16", 6))
    kept = narrow.model.layers[3].mlp.gate_proj.weight
    assert all(any(torch.equal(row, t) for t in teacher.model.layers[3].mlp.gate_proj.weight) for row in kept)


def test_role_predicates_name_what_follows_what_attends_and_what_changed():
    """`followers()` are the layers that follow a leader (not dropped or linear ones, which every caller filtered back
    out); `attends` is what keeps a KV cache; `attention_changed` is all three."""
    from echoatt.building.student import build_student
    from echoatt.planning.plan import SharingPlan

    student = build_student(tiny_teacher(), SharingPlan(6, ((1, 2),), dropped=(4,), linear=(3,)))
    config = student.config
    assert config.followers() == [2] and [config.follows(i) for i in range(6)] == [False, False, True, False, False,
                                                                                     False]
    assert [config.attends(i) for i in range(6)] == [True, True, True, False, False, True]
    assert config.attention_changed() == [2, 3, 4]
    assert [config.cached_value_dims(i) > 0 for i in range(6)] == [config.attends(i) for i in range(6)]
