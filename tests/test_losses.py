"""Loss functions against hand-computed formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from echoatt.training.losses import IGNORE_INDEX, hard_label_loss, hidden_state_loss, soft_label_loss


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_output_kd_equals_the_pure_losses_and_their_gradients(dtype):
    """`fused_output_kd` (logits formed a chunk at a time from hidden states and output embeddings) gives the numbers
    and gradients of `hard_label_loss` + `soft_label_loss` on the whole logits, ignored labels included."""
    from echoatt.training.losses import fused_output_kd

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=gen) / 2).to(dtype).requires_grad_()
    t_hidden, t_weight = torch.randn(2, 9, 16, generator=gen).to(dtype), torch.randn(50, 16, generator=gen).to(dtype)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[1, 4:] = -100
    fused, hard, soft = fused_output_kd(hidden, weight, t_hidden, t_weight, labels, 0.3, 0.7, 2.0, chunk_bytes=1)
    fused.backward()
    got = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits, t_logits = (hidden @ weight.T).float(), (t_hidden @ t_weight.T).float()  # as a model's output layer
    ref_hard, ref_soft = hard_label_loss(logits, labels), soft_label_loss(logits, t_logits, labels, 2.0)
    (0.3 * ref_hard + 0.7 * ref_soft).backward()
    assert hard.item() == pytest.approx(ref_hard.item(), rel=1e-5)
    assert soft.item() == pytest.approx(ref_soft.item(), rel=1e-5)
    assert fused.item() == pytest.approx(0.3 * ref_hard.item() + 0.7 * ref_soft.item(), rel=1e-5)
    for mine, ref in zip(got, (hidden.grad, weight.grad)):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.float(), ref.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-4 if dtype == torch.float32 else 1e-2)


def test_fused_output_kd_under_autocast_computes_at_autocasts_precision():
    """Under bf16 autocast (distillation on a GPU) the fused loss's output matmuls run in bf16, as the model's own
    output layer would there — not in float32 with autocast switched off (half a 1B step's time) — while the loss and
    the weights' gradient stay float32: the numbers of the pure losses on autocast's logits, not on float32 ones."""
    from echoatt.training.losses import fused_output_kd

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 32, generator=gen).requires_grad_()
    weight = (torch.randn(64, 32, generator=gen) / 2).requires_grad_()
    t_hidden, t_weight = torch.randn(2, 9, 32, generator=gen), torch.randn(64, 32, generator=gen)
    labels = torch.randint(0, 64, (2, 9), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_output_kd(hidden, weight, t_hidden, t_weight, labels, 0.3, 0.7, 2.0, chunk_bytes=1)[0]
        fused.backward()
        got = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        logits, t_logits = (hidden @ weight.T).float(), (t_hidden @ t_weight.T).float()  # bf16 matmuls
        (0.3 * hard_label_loss(logits, labels) + 0.7 * soft_label_loss(logits, t_logits, labels, 2.0)).backward()
    exact = (hidden.detach() @ weight.detach().T, t_hidden @ t_weight.T)  # float32 logits
    ref_exact = 0.3 * hard_label_loss(exact[0], labels) + 0.7 * soft_label_loss(*exact, labels, 2.0)
    ref = 0.3 * hard_label_loss(logits.detach(), labels) + 0.7 * soft_label_loss(logits.detach(), t_logits, labels, 2.0)
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(ref.item(), rel=1e-5)
    assert abs(fused.item() - ref_exact.item()) > 1e-4 * abs(ref_exact.item())  # bf16 products differ from float32
    for mine, expected in zip(got, (hidden.grad, weight.grad)):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, expected, atol=2e-3, rtol=2e-2)


def test_kd_loss_fused_and_from_logits_agree_on_a_model(teacher):
    """The objective on real models: the fused path (no logits) and the logits path give the same terms and the same
    gradients, tied embeddings and all."""
    from echoatt.building.student import build_student
    from echoatt.planning.plan import SharingPlan
    from echoatt.training.losses import KDLoss

    student = build_student(teacher, SharingPlan(6, ((1, 2),))).train()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (True, False):
        terms = KDLoss()(student, teacher, ids, fused=fused)
        terms["loss"].backward()
        results.append(({k: v.item() for k, v in terms.items()},
                        {n: p.grad.clone() for n, p in student.named_parameters()}))
        student.zero_grad(set_to_none=True)
    (fused_terms, fused_grads), (terms, grads) = results
    assert fused_terms.keys() == terms.keys() == {"hard", "soft", "hidden", "loss"}
    for key, value in terms.items():
        assert fused_terms[key] == pytest.approx(value, rel=1e-5), key
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_fused_objective_keeps_its_memory_budget_per_token_and_vocabulary_entry():
    """At 2,048 positions x a 32,000-entry vocabulary, the fused output terms (forward and backward) add under two
    bytes per (token x vocabulary) entry (1.2 measured here; the fixed part is the weight gradient and one chunk);
    the same terms from whole logits add over eight (25 here), which shows the measurement
    sees what it measures. Peaks are the process's resident high-water mark (Linux), reset before each."""
    from echoatt.training.losses import fused_output_kd
    from echoatt.training.memory import PeakMemory

    tokens, vocab, width = 2048, 32000, 64
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, width, generator=gen) / 8).requires_grad_()
    t_weight = torch.randn(vocab, width, generator=gen) / 8
    hidden, t_hidden = (torch.randn(1, tokens + 1, width, generator=gen) for _ in range(2))
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    per_entry = {}
    for fused in (True, False):
        with PeakMemory(torch.device("cpu")) as peak:
            h = hidden.clone().requires_grad_()
            if fused:
                loss = fused_output_kd(h, weight, t_hidden, t_weight, labels, 0.1, 1.0, 2.0, chunk_bytes=2**22)[0]
            else:
                logits, t_logits = h @ weight.T, t_hidden @ t_weight.T
                loss = 0.1 * hard_label_loss(logits, labels) + soft_label_loss(logits, t_logits, labels, 2.0)
            loss.backward()
            del loss, h
            logits = t_logits = None
        if peak.bytes is None:
            pytest.skip("no resident-memory high-water mark to read on this system (/proc/self/clear_refs)")
        per_entry[fused] = peak.bytes / (tokens * vocab)
        weight.grad = None
    assert per_entry[True] < 2.0 and per_entry[False] > 8.0, per_entry


def test_topk_soft_label_loss_by_formula_and_at_full_vocabulary():
    """The top-k soft loss is T² KL over the teacher's top k plus one bucket for the rest, from tempered log-probabilities;
    with k = V it is the full soft loss; with a smaller k it is below it (a coarser KL), not above."""
    from echoatt.training.losses import topk_soft_label_loss

    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 7, 30, generator=gen, dtype=torch.float64), torch.randn(2, 7, 30, generator=gen,
                                                                                   dtype=torch.float64)
    labels = torch.randint(0, 30, (2, 7), generator=gen)
    labels[0, 3] = IGNORE_INDEX
    T = 2.0
    log_p = torch.log_softmax(t / T, -1)  # the teacher at the temperature, as the cache keeps it
    full = log_p.topk(30, -1)
    assert topk_soft_label_loss(s, full.indices, full.values, labels, T).item() == pytest.approx(
        soft_label_loss(s, t, labels, T).item(), rel=1e-10)
    top = log_p.topk(4, -1)
    p = top.values[:, :-1].exp()  # (2, 6, 4)
    q_all = torch.softmax(s[:, :-1] / T, -1)
    q = q_all.gather(-1, top.indices[:, :-1])
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    per_position = (p * (p / q).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    valid = labels[:, 1:] != IGNORE_INDEX
    expected = (per_position * valid).sum() * T**2 / valid.sum()
    got = topk_soft_label_loss(s, top.indices, top.values, labels, T)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    assert 0 < got.item() < soft_label_loss(s, t, labels, T).item()


def test_fused_output_kd_from_top_k_equals_the_pure_top_k_loss_and_gradients():
    """The fused loss against cached top-k teacher outputs gives `topk_soft_label_loss`'s number and gradients."""
    from echoatt.training.losses import fused_output_kd, topk_soft_label_loss

    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 16, generator=gen).requires_grad_()
    weight = (torch.randn(50, 16, generator=gen) / 2).requires_grad_()
    top = torch.log_softmax(torch.randn(2, 9, 50, generator=gen) / 2.0, -1).topk(6, -1)  # at the temperature
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[1, 4:] = -100
    fused, hard, soft = fused_output_kd(hidden, weight, None, None, labels, 0.3, 0.7, 2.0, chunk_bytes=1,
                                        teacher_topk=(top.indices, top.values))
    fused.backward()
    got = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    ref_hard, ref_soft = hard_label_loss(logits, labels), topk_soft_label_loss(logits, top.indices, top.values, labels,
                                                                               2.0)
    (0.3 * ref_hard + 0.7 * ref_soft).backward()
    assert hard.item() == pytest.approx(ref_hard.item(), rel=1e-5)
    assert soft.item() == pytest.approx(ref_soft.item(), rel=1e-5)
    for mine, ref in zip(got, (hidden.grad, weight.grad)):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("top_k", [0, 128])
def test_kd_loss_from_cached_teacher_outputs_equals_running_the_teacher(teacher, tmp_path, top_k):
    """With the teacher's outputs from the cache — its final hidden states (k = 0), or its top k = V log-probabilities
    — and float32 hidden states, the objective and its gradients are those of running the teacher, on both paths; the
    second read comes from disk, the teacher not run."""
    from echoatt.building.student import build_student
    from echoatt.planning.plan import SharingPlan
    from echoatt.training import teacher_cache
    from echoatt.training.losses import KDLoss
    from echoatt.training.teacher_cache import TeacherCache

    teacher_cache.HIDDEN_DTYPE = torch.float32  # exact here; the default keeps bf16 on disk
    try:
        student = build_student(teacher, SharingPlan(6, ((1, 2),))).train()
        ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
        cache = TeacherCache(tmp_path, "tiny", top_k, KDLoss.temperature, teacher)
        first = cache.outputs(teacher, ids)
        assert (cache.read, cache.written) == (0, 2) and len(list(cache.folder.iterdir())) == 2
        calls = []
        handle = teacher.register_forward_hook(lambda *a: calls.append(1))
        cached = cache.outputs(teacher, ids)
        handle.remove()
        assert not calls and (cache.read, cache.written) == (2, 2)
        torch.testing.assert_close(cached.final if top_k == 0 else cached.topk_logprobs,
                                   first.final if top_k == 0 else first.topk_logprobs)
        for fused in (True, False):
            results = []
            for outputs in (None, cached):
                terms = KDLoss()(student, teacher, ids, fused=fused, **({"cached": outputs} if outputs else {}))
                terms["loss"].backward()
                results.append(({k: v.item() for k, v in terms.items()},
                                {n: p.grad.clone() for n, p in student.named_parameters()}))
                student.zero_grad(set_to_none=True)
            (ran, ran_grads), (read, read_grads) = results
            assert ran.keys() == read.keys()
            for key, value in ran.items():
                assert read[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (fused, key)
            for name, grad in ran_grads.items():
                torch.testing.assert_close(read_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
        if top_k:
            with pytest.raises(ValueError, match="temperature"):
                KDLoss(temperature=1.0)(student, teacher, ids, cached=cached)
    finally:
        teacher_cache.HIDDEN_DTYPE = torch.bfloat16
