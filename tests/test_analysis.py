"""Attention similarity: exact on constructed cases, and chunking never changes the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_teacher

from echoatt.planning import analysis
from echoatt.planning.analysis import Similarity, attention_similarity


def windows(n=3, length=24, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def test_self_similarity_is_one(teacher):
    sim = attention_similarity(teacher, windows(), progress=False)
    assert np.allclose(np.diag(sim.head_avg), 1.0, atol=1e-6)
    assert np.allclose(np.einsum("ihih->ih", sim.head_head), 1.0, atol=1e-6)
    assert (sim.head_avg < 0.999).any()  # random layers are not all alike


def copying_teacher(permute_layer: int | None = None, perm=(2, 0, 3, 1)):
    """Layers that leave the residual stream unchanged and share q/k weights: every layer attends alike.
    Optionally one layer's heads are permuted, so only head matching sees the copy."""
    model = tiny_teacher(num_key_value_heads=4)
    layers = model.model.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.q_proj.weight.copy_(layers[0].self_attn.q_proj.weight)
            layer.self_attn.k_proj.weight.copy_(layers[0].self_attn.k_proj.weight)
        if permute_layer is not None:
            attn = layers[permute_layer].self_attn
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.copy_(proj.weight.view(4, 16, 64)[list(perm)].reshape(64, 64))
    return model


def test_layers_that_copy_attention_have_similarity_one():
    sim = attention_similarity(copying_teacher(), windows(), progress=False)
    assert np.allclose(sim.head_avg, 1.0, atol=1e-5)
    assert np.allclose(sim.same_head, 1.0, atol=1e-5)


def test_head_matching_recovers_a_permutation():
    perm = (2, 0, 3, 1)  # layer 3's head h computes layer 2's head perm[h]
    sim = attention_similarity(copying_teacher(permute_layer=3, perm=perm), windows(), progress=False)
    assert sim.head_map(3, 2) == list(perm)
    assert sim.same_head[3, 2].mean() < 0.99
    assert sim.head_matched[3, 2] == pytest.approx(1.0, abs=1e-5)
    assert sim.head_avg[3, 2] == pytest.approx(1.0, abs=1e-5)  # the average hides the permutation
    grouped = sim.head_map(3, 2, kv_groups=2)  # each head picks only among its own KV group's leader heads
    assert [g // 2 for g in grouped] == [h // 2 for h in range(4)]
    assert grouped[1] == 0 and grouped[2] == 3  # where the true match lies inside the group, it is still found


def test_chunked_equals_whole(teacher, monkeypatch):
    whole = attention_similarity(teacher, windows(), batch_size=3, progress=False)
    monkeypatch.setattr(analysis, "CHUNK_BYTES", 1)  # one query row at a time
    chunked = attention_similarity(teacher, windows(), batch_size=1, progress=False)
    ulps = 64 * np.finfo(np.float32).eps  # cosines <= 1, summed in another order by other batch shapes' kernels
    np.testing.assert_allclose(chunked.head_head, whole.head_head, atol=ulps, rtol=0)
    np.testing.assert_allclose(chunked.head_avg, whole.head_avg, atol=ulps, rtol=0)


def test_save_load_and_heatmap(teacher, tmp_path):
    sim = attention_similarity(teacher, windows(), progress=False, settings={"seq_len": 24})
    sim.save(tmp_path / "s.json")
    back = Similarity.load(tmp_path / "s.json")
    np.testing.assert_allclose(back.head_head, sim.head_head, atol=1e-5)
    assert back.tokens == 72 and back.settings == {"seq_len": 24}
    sim.heatmap(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert "adjacent layers" in sim.summary()


def test_induction_scores_read_the_attention_on_the_token_after_the_earlier_occurrence(teacher):
    """Against the eager attention's own probabilities, position by position."""
    from echoatt.evaluation.metrics import repeated_tokens
    from echoatt.planning.analysis import induction_scores

    probe = repeated_tokens(3, 10, 128, seed=1, exclude=[0, 1, 2])
    assert probe.shape == (3, 20) and torch.equal(probe[:, :10], probe[:, 10:]) and probe.min() >= 3
    scores = induction_scores(teacher, probe)
    teacher.config._attn_implementation = "eager"
    attentions = teacher(input_ids=probe, output_attentions=True).attentions  # L x (N, H, T, T)
    expected = [[np.mean([a[n, h, q, q - 9].item() for n in range(3) for q in range(10, 20)])
                 for h in range(a.shape[1])] for a in attentions]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    sim = attention_similarity(teacher, windows(), progress=False)
    sim.induction = scores
    assert "heads that retrieve from context" in sim.summary()


def test_attention_redundancy_is_llm_drops_cosine(teacher):
    """cos(x, x + attn(x)) of the residual stream around each attention, averaged over tokens."""
    from echoatt.planning.analysis import attention_redundancy

    ids = windows(2, 16)
    got = attention_redundancy(teacher, ids, batch_size=1)
    hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    layer = teacher.model.layers[0]
    x = hidden[0]
    attn = layer.self_attn(layer.input_layernorm(x), teacher.model.rotary_emb(x, torch.arange(16)[None]), None)[0]
    expected = torch.nn.functional.cosine_similarity(x, x + attn, dim=-1).mean().item()
    assert got[0] == pytest.approx(expected, abs=1e-5)
    assert got.shape == (6,) and ((got > -1) & (got <= 1)).all()
