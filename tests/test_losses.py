"""Loss functions against hand-computed formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from echoatt.losses import IGNORE_INDEX, hard_label_loss, hidden_state_loss, soft_label_loss


def test_hard_label_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])  # (1, 3, 3)
    labels = torch.tensor([[0, 0, 1]])
    # position 0 predicts label 0, position 1 predicts label 1
    expected = (-math.log(math.e**2 / (math.e**2 + 2)) - math.log(math.e / (math.e + 2))) / 2
    assert hard_label_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    labels[0, 2] = IGNORE_INDEX
    assert hard_label_loss(logits, labels).item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + 2)), rel=1e-6)


def test_soft_label_loss_by_hand():
    # float64 throughout: the formula is checked exactly, not float32's rounding of a small KL (rel. error ~1e-6)
    s = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]], dtype=torch.float64)  # (1, 2, 2): only position 0 counts
    t = torch.tensor([[[math.log(3.0), 0.0], [1.0, 2.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 1]])
    T = 2.0
    p = torch.softmax(torch.tensor([math.log(3.0), 0.0], dtype=torch.float64) / T, -1)  # teacher at temperature T
    expected = T**2 * float((p * (p.log() - math.log(0.5))).sum())
    assert soft_label_loss(s, t, labels, temperature=T).item() == pytest.approx(expected, rel=1e-12)


def test_soft_label_loss_zero_when_logits_match_and_matches_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 50), torch.randn(2, 9, 50)
    labels = torch.randint(0, 50, (2, 9))
    assert soft_label_loss(t, t, labels, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    reference = F.kl_div(F.log_softmax(s[:, :-1] / 3, -1), F.log_softmax(t[:, :-1] / 3, -1), log_target=True,
                         reduction="none").sum(-1).mean() * 9
    assert soft_label_loss(s, t, labels, 3.0).item() == pytest.approx(reference.item(), rel=1e-5)


def test_soft_label_loss_chunked_equals_unchunked_and_ignores_padding():
    torch.manual_seed(1)
    s, t = torch.randn(2, 17, 40), torch.randn(2, 17, 40)
    labels = torch.randint(0, 40, (2, 17))
    labels[1, 10:] = IGNORE_INDEX
    whole = soft_label_loss(s, t, labels, 2.0, chunk_size=10_000)
    assert soft_label_loss(s, t, labels, 2.0, chunk_size=3).item() == pytest.approx(whole.item(), rel=1e-6)
    t2 = t.clone()
    t2[1, 9:-1] += 100 * torch.randn(7, 40)  # positions whose next label is ignored cannot matter
    assert soft_label_loss(s, t2, labels, 2.0).item() == pytest.approx(whole.item(), rel=1e-6)


def test_hidden_state_loss_by_hand():
    s = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])]  # (1, 2, 2)
    t = [torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])]
    # squared error per token: mean((1-2)^2, 0) = 0.5; teacher mean square: 2; relative: 0.25
    assert hidden_state_loss(s, t, kind="mse").item() == pytest.approx(0.25)
    assert hidden_state_loss(s, t, kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 0]])
    s2 = [torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])]
    assert hidden_state_loss(s2, t, mask=mask, kind="mse").item() == pytest.approx(0.25)
    # two layers: the mean of each layer's loss, each relative to its own teacher's scale (0.25 and 1.0 here)
    far = [torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]) * 4]  # teacher mean square 32; squared error 18 per token
    assert hidden_state_loss(s + [t[0] * 2], t + [t[0] * 4], kind="mse").item() == pytest.approx((0.25 + 0.25) / 2)
    assert hidden_state_loss(s + [t[0] * 1.0], t + far, kind="mse").item() == pytest.approx((0.25 + 18 / 32) / 2)
    with pytest.raises(ValueError, match="mse or cosine"):
        hidden_state_loss(s, t, kind="l1")
