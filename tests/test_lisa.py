"""LiSA followers: exact start from the head-matched copy, training only the new parts, cache, save/load, chains."""

from __future__ import annotations

import pytest
import torch
from conftest import QK_PARTS, attention_parameters, path_tolerance
from transformers import AutoModelForCausalLM

from echoatt.building.student import build_student, kv_cache_bytes_per_token, parameter_report
from echoatt.model.configuration_echoatt import EchoAttConfig
from echoatt.model.modeling_echoatt import Handoff, output_cache
from echoatt.planning.plan import SharingPlan
from echoatt.training.distill import set_trainable

MAPS = [None, None, [1, 0, 3, 2], None, [2, 2, 0, 1], None]  # follower 2 reads 1, follower 4 reads 3


def lisa_of(teacher, blocks=((1, 2), (3, 4)), impl="sdpa", head_map=MAPS, rank=None):
    teacher.config._attn_implementation = impl
    plan = SharingPlan(teacher.config.num_hidden_layers, tuple(tuple(b) for b in blocks))
    return build_student(teacher, plan, head_map, method="lisa", lisa_rank=rank)


def ids(batch=2, length=12, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def eager_sdpa_tolerance(teacher, x: torch.Tensor) -> float:
    """The teacher's own gap between eager attention (scores scaled after QK^T) and SDPA (Q scaled before), the
    reference for LiSA's paths, which differ from the copy's and from each other in the same way."""
    logits = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            teacher.config._attn_implementation = impl
            logits[impl] = teacher(x).logits
    return path_tolerance(logits["eager"], logits["sdpa"])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_new_lisa_student_is_exactly_the_head_matched_copy(teacher, impl):
    x = ids()
    tolerance = eager_sdpa_tolerance(teacher, x)
    lisa = lisa_of(teacher, impl=impl)
    copy = build_student(teacher, SharingPlan(6, ((1, 2), (3, 4))), MAPS)
    copy.config.reuse_path = "probs"  # the leader materialises its attention exactly as LiSA's source does
    with torch.no_grad():  # to float rounding: LiSA scales Q before QK^T, eager attention scales the scores after
        torch.testing.assert_close(lisa(x).logits, copy(x).logits, atol=tolerance, rtol=0)
        assert not torch.allclose(lisa(x).logits, teacher(x).logits, atol=1e-3)


def test_lisa_parts_and_default_rank(teacher):
    lisa = lisa_of(teacher)
    attn = lisa.model.layers[2].self_attn
    assert not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj")
    r = lisa.config.lisa_rank
    assert r == max(2, lisa.config.head_dim // 6 // 2 * 2)  # head_dim // 6, rounded down to even
    assert attn.lowrank.query.shape == (4 * r, 64) and attn.lowrank.key.shape == (2 * r, 64)
    assert attn.align.mix.shape == (4, 4) and attn.align.down.shape == (4, 4)
    assert torch.equal(attn.align.mix.argmax(1), torch.tensor(MAPS[2]))
    assert attn.lowrank.query.abs().sum() == 0 and attn.align.up.abs().sum() == 0
    assert attn.lowrank.key.abs().sum() > 0  # the teacher layer's own keys, compressed
    removed = sum(attention_parameters(teacher, i, QK_PARTS) for i in (2, 4))
    added = 2 * (64 * r * (4 + 2) + 3 * 4 * 4)
    assert parameter_report(teacher, lisa)["removed"] == removed - added


def test_only_lisa_parameters_train_and_all_of_them_get_gradients(teacher):
    lisa = lisa_of(teacher).train()
    names = set(set_trainable(lisa, "auto"))
    assert names and all(".align." in n or ".lowrank." in n for n in names)
    opt = torch.optim.SGD([p for p in lisa.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(2):  # after one step the zero-initialised parts open the gradient path to the others
        opt.zero_grad()
        lisa(x, labels=x).loss.backward()
        opt.step()
    for name, param in lisa.named_parameters():
        if name in names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_lisa_cache_holds_low_rank_keys_and_generation_matches(teacher):
    lisa = lisa_of(teacher)
    with torch.no_grad():  # a non-zero low-rank term, so the cached keys matter
        for layer in (2, 4):
            lisa.model.layers[layer].self_attn.lowrank.query.normal_(std=0.5)
        cache = output_cache(lisa(ids(), use_cache=True))
    for layer in range(6):
        dims = lisa.config.lisa_rank if layer in (2, 4) else lisa.config.head_dim
        assert cache.layers[layer].keys.shape == (2, 2, 12, dims)
    total = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    assert total == kv_cache_bytes_per_token(lisa.config, dtype_bytes=4) * 2 * 12
    x = ids(batch=1, length=6)
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    assert torch.equal(lisa.generate(x, use_cache=True, **kw), lisa.generate(x, use_cache=False, **kw))


def test_lisa_chain_reads_the_layer_before(teacher):
    lisa = lisa_of(teacher, blocks=((1, 2, 3),), head_map=None)
    assert lisa.config.attention_source == [0, 1, 1, 2, 4, 5]
    with torch.no_grad():
        for layer in (2, 3):
            lisa.model.layers[layer].self_attn.align.up.normal_()
        x = ids()
        eager = lisa(x).logits
        lisa.config._attn_implementation = "eager"
        torch.testing.assert_close(lisa(x).logits, eager, atol=eager_sdpa_tolerance(teacher, x), rtol=0)
    bad = {**lisa.config.to_dict(), "attention_source": [0, 1, 2, 1, 4, 5]}  # 3 would read 1, not 2
    bad = {k: v for k, v in bad.items() if k in EchoAttConfig.__dataclass_fields__ and k != "model_type"}
    with pytest.raises(ValueError, match="layer before it"):
        EchoAttConfig(**bad)


def test_lisa_save_load_round_trip(teacher, tmp_path):
    lisa = lisa_of(teacher)
    with torch.no_grad():
        lisa.model.layers[2].self_attn.align.up.normal_()
    lisa.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.follower_type == "lisa"
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, lisa(x).logits)


def test_gradcheck_lisa_follower(teacher):
    """LiSA's analytic gradients, with respect to its input and the source's logits, match finite differences."""
    lisa = lisa_of(teacher.double())
    attn = lisa.model.layers[2].self_attn
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn.align.up.normal_(generator=gen)
        attn.lowrank.query.normal_(generator=gen)
    hidden = torch.randn(1, 4, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    logits = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    rotary = lisa.model.rotary_emb(hidden, torch.arange(4)[None])
    run = lambda h, s: attn(h, rotary, attention_handoff={1: Handoff(logits=s)})[0]
    assert torch.autograd.gradcheck(run, (hidden, logits), eps=1e-6, atol=1e-6, fast_mode=True)


def test_lisa_parts_get_their_own_learning_rate(teacher):
    from echoatt.run.config import DistillConfig
    from echoatt.training.distill import param_groups

    lisa = lisa_of(teacher)
    set_trainable(lisa, "shared")  # LiSA's parts and the follower layers' own weights
    groups = {g["lr"]: g["params"] for g in param_groups(lisa, DistillConfig(lr=3e-4, lisa_lr=1e-2))}
    lisa_params = {id(p) for n, p in lisa.named_parameters() if ".align." in n or ".lowrank." in n}
    assert {id(p) for p in groups[1e-2]} == lisa_params
    assert groups[3e-4] and not lisa_params & {id(p) for p in groups[3e-4]}


def test_a_lisa_plan_of_dropped_layers_only_trains_like_any_other(teacher):
    """A budget can leave a LiSA student no LiSA follower (only dropped attention): `auto` then trains every
    parameter, as for any copy or drop student, instead of finding nothing to train; `shared` trains the layers
    around the dropped ones."""
    plan = SharingPlan(6, (), (2, 4))
    student = build_student(teacher, plan, method="lisa")
    assert student.config.follower_type == "lisa" and student.config.followers() == []
    assert student.config.attention_changed() == [2, 4]
    assert set_trainable(student, "auto") == [name for name, _ in student.named_parameters()]
    names = set_trainable(student, "shared")
    assert names and all(".layers.2." in n or ".layers.3." in n or ".layers.4." in n or ".layers.5." in n
                         for n in names)
