"""Key tokens (`key_tokens.py`), the key-token weighting of the loss and the in-context copies the `read` plan measure
scores (`corpus.repeat_spans`), each against its formula on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_teacher

from echoatt.evaluation import key_tokens
from echoatt.evaluation.key_tokens import (
    FAR_FROM,
    GainCache,
    context_gain,
    context_weights,
    key_mask,
    text_perplexities,
)
from echoatt.evaluation.metrics import perplexity, token_nll
from echoatt.inputs.corpus import repeat_spans
from echoatt.run.results import key_row, point_perplexities
from echoatt.training.losses import (
    IGNORE_INDEX,
    KDLoss,
    fused_output_kd,
    hard_label_loss,
    soft_label_loss,
    topk_soft_label_loss,
)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_context_gain_is_the_full_minus_the_truncated_log_probability(family):
    """The gain of prediction t is log p(token t+1 | tokens 0..t) − log p(token t+1 | the sinks and the last tokens up
    to t from its chunk's start), each run by hand at its own positions; 0 where nothing is left out."""
    model = tiny_teacher(family=family)
    windows = torch.randint(3, 128, (2, 41), generator=torch.Generator().manual_seed(0))
    near, sinks, chunk = 8, 2, 4
    gain = context_gain(model, windows, near=near, sinks=sinks)
    full = token_nll(model, windows)
    assert gain.shape == (2, 40)
    assert gain[:, :8].abs().max() == 0  # chunks 0-3 and 4-7 see all of their context (end - near <= sinks)
    for n, t in ((0, 8), (0, 30), (1, 17), (1, 39)):
        start = t // chunk * chunk
        end = min(start + chunk, 40)
        keep = [*range(sinks), *range(end - near, t + 1)]
        with torch.no_grad():
            logits = model(input_ids=windows[n, keep][None], position_ids=torch.tensor([keep])).logits[0, -1]
        near_nll = -torch.log_softmax(logits.float(), -1)[windows[n, t + 1]]
        assert gain[n, t].item() == pytest.approx((near_nll - full[n, t]).item(), abs=1e-4)
    assert gain.abs().max() > 1e-2  # the far context matters somewhere: a test that can fail


def test_key_mask_and_context_weights_by_hand():
    gain = torch.zeros(1, FAR_FROM + 3)
    gain[0, FAR_FROM - 2] = 5.0  # predicts token FAR_FROM - 1: too early to count
    gain[0, FAR_FROM - 1] = 2.0  # predicts token FAR_FROM: key
    gain[0, FAR_FROM] = 1.9
    gain[0, FAR_FROM + 1] = -3.0
    gain[0, FAR_FROM + 2] = 9.0
    assert key_mask(gain)[0].nonzero().squeeze(1).tolist() == [FAR_FROM - 1, FAR_FROM + 2]
    w = context_weights(gain, 0.5, cap=4.0)
    assert w[0, FAR_FROM - 2] == 1  # no far context: weight 1
    assert w[0, FAR_FROM - 1:].tolist() == pytest.approx([2.0, 1.95, 1.0, 3.0])  # 1 + 0.5 min(max(g, 0), 4)
    assert torch.equal(context_weights(gain, 0.0), torch.ones_like(gain))


def test_gain_cache_computes_each_window_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHOATT_CACHE", str(tmp_path))
    model = tiny_teacher()
    windows = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    cache = GainCache("tiny", model, near=4, sinks=1)
    first = cache.gains(model, windows[:2])
    assert torch.equal(first, context_gain(model, windows[:2], near=4, sinks=1))
    calls = []
    real = key_tokens.context_gain
    monkeypatch.setattr(key_tokens, "context_gain", lambda m, w, *a: calls.append(len(w)) or real(m, w, *a))
    again = cache.gains(model, windows[[1, 2, 0]])
    assert calls == [1]  # only the window not seen before
    assert torch.equal(again[[2, 0]], first)
    assert torch.equal(GainCache("another teacher", model, near=4, sinks=1).gains(model, windows[:1]), first[:1])
    assert calls == [1, 1]  # another stamp: another folder, computed again


def test_text_perplexities_score_every_token_and_the_key_ones(monkeypatch):
    model = tiny_teacher()
    windows = torch.randint(3, 128, (2, FAR_FROM + 20), generator=torch.Generator().manual_seed(2))
    keys = torch.zeros(2, FAR_FROM + 19, dtype=torch.bool)
    keys[0, FAR_FROM : FAR_FROM + 4] = True
    keys[1, -1] = True
    scores = text_perplexities(model, {"held-out text": windows}, {"held-out text": keys})
    nll = token_nll(model, windows)
    assert scores["held-out text"]["perplexity"] == pytest.approx(perplexity(model, windows), rel=1e-5)
    key = scores[key_row("held-out text")]
    assert key["perplexity"] == pytest.approx(math.exp(nll[keys].mean().item()), rel=1e-5)
    assert key["percent"] == pytest.approx(100 * 5 / (2 * 20))  # of the predictions with far context
    assert point_perplexities(scores) == {"perplexity": scores["held-out text"]["perplexity"],
                                          "key_perplexity": key["perplexity"]}
    none = text_perplexities(model, {"held-out text": windows}, {"held-out text": torch.zeros_like(keys)})
    assert key_row("held-out text") not in none  # no key tokens: no row, never a NaN


def test_weighted_losses_by_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(11, (2, 6))
    labels[1, 3] = IGNORE_INDEX
    w = torch.rand(2, 5) * 3
    valid = (labels[:, 1:] != IGNORE_INDEX).float()
    ce = torch.nn.functional.cross_entropy(s[:, :-1].transpose(1, 2), labels[:, 1:].clamp_min(0), reduction="none")
    p_t, log_q = torch.softmax(t[:, :-1] / 2, -1), torch.log_softmax(s[:, :-1] / 2, -1)
    kl = (p_t * (p_t.log() - log_q)).sum(-1)
    expect = lambda x: (x * w * valid).sum() / (w * valid).sum()
    assert hard_label_loss(s, labels, weights=w).item() == pytest.approx(expect(ce).item(), rel=1e-5)
    assert soft_label_loss(s, t, labels, 2.0, weights=w).item() == pytest.approx(4 * expect(kl).item(), rel=1e-5)
    ones = torch.ones(2, 5)
    assert hard_label_loss(s, labels, weights=ones).item() == pytest.approx(hard_label_loss(s, labels).item(), rel=1e-6)
    assert soft_label_loss(s, t, labels, 2.0, weights=ones).item() == pytest.approx(
        soft_label_loss(s, t, labels, 2.0).item(), rel=1e-6)
    top = torch.log_softmax(t / 2, -1).topk(11, -1)  # k = V: the full KL
    assert topk_soft_label_loss(s, top.indices, top.values, labels, 2.0, weights=w).item() == pytest.approx(
        4 * expect(kl).item(), rel=1e-4)


def test_fused_weighted_loss_equals_the_pure_functions_and_their_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    t_hidden, t_weight = torch.randn(2, 7, 8), torch.randn(13, 8)
    labels = torch.randint(13, (2, 7))
    w = torch.rand(2, 6) * 4
    loss, hard, soft = fused_output_kd(hidden, weight, t_hidden, t_weight, labels, 0.3, 1.0, 2.0, chunk_bytes=4 * 13 * 5,
                                       weights=w)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    ref_hard = hard_label_loss(logits, labels, weights=w)
    ref_soft = soft_label_loss(logits, t_hidden @ t_weight.T, labels, 2.0, weights=w)
    (0.3 * ref_hard + ref_soft).backward()
    assert hard.item() == pytest.approx(ref_hard.item(), rel=1e-5)
    assert soft.item() == pytest.approx(ref_soft.item(), rel=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)


def test_kd_loss_with_weights_one_is_the_plain_loss_and_other_weights_change_it():
    teacher, student = tiny_teacher(0), tiny_teacher(1)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = KDLoss()
    plain = loss(student, teacher, ids)["loss"].item()
    assert loss(student, teacher, ids, weights=torch.ones(2, 15))["loss"].item() == pytest.approx(plain, rel=1e-6)
    w = torch.ones(2, 15)
    w[:, -5:] = 4.0
    fused = loss(student, teacher, ids, weights=w)
    unfused = loss(student, teacher, ids, fused=False, weights=w)
    assert fused["loss"].item() == pytest.approx(unfused["loss"].item(), rel=1e-5)
    assert fused["loss"].item() != pytest.approx(plain, rel=1e-3)


def test_repeat_spans_copies_the_first_half_into_the_second():
    windows = torch.arange(3 * 40).view(3, 40)
    out, reads = repeat_spans(windows, seed=0, span=5)
    for n in range(3):
        assert torch.equal(out[n, :20], windows[n, :20])  # the first half stays
        for start in range(20, 40, 5):
            span = out[n, start : start + 5]
            source = (span[0] - windows[n, 0]).item()
            assert 0 <= source <= 15 and torch.equal(span, windows[n, source : source + 5])  # a copy of the first half
            assert reads[n, start : start + 4].all()  # predictions of its 2nd .. last tokens read the copy
            assert start + 4 == 39 or not reads[n, start + 4]  # of the next span's first: not
    assert not reads[:, :19].any()
    assert torch.equal(windows, torch.arange(3 * 40).view(3, 40))  # the input is left as it was
    assert torch.equal(repeat_spans(windows[:, :8], span=5)[0], windows[:, :8])  # too short a window: as it was
