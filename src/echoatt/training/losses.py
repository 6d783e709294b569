"""Distillation losses as pure functions (like torchtune's `kd_losses.py`), each tested against its formula, and
`KDLoss`, the weighted objective that distillation (and the benchmark's distillation step) computes with them.

All reduce to a mean over valid positions: those whose label is not `ignore_index` (hard and soft labels) or whose
attention-mask entry is 1 (hidden states). The output terms also take per-prediction `weights` (B, T-1), e.g. the
key-token weights of `key_tokens.context_weights`: then a weighted mean, Σ w·loss / Σ w over valid positions, which
is the plain mean where every weight is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _exact(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 at least (bf16 logits lose the small differences KL is made of; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _weighted_mean(per_prediction: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                   ignore_index: int) -> torch.Tensor:
    """Σ w·x / Σ w over the valid predictions of a per-prediction loss (B, T-1) (w = 1 without `weights`)."""
    w = (labels[:, 1:] != ignore_index).to(per_prediction.dtype)
    if weights is not None:
        w = w * _exact(weights)
    return (per_prediction * w).sum() / w.sum().clamp_min(1e-12 if weights is not None else 1)


def hard_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one (`reduction="sum"` for
    perplexity over many batches); with per-prediction `weights` (B, T-1), their weighted mean."""
    logits = _exact(logits[:, :-1])
    if weights is not None:
        ce = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].clamp_min(0).flatten(),
                             reduction="none").view(labels[:, 1:].shape)  # (B, T-1)
        return _weighted_mean(ce, labels, weights, ignore_index)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def soft_label_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of temperature-scaled next-token distributions, mean over valid positions (weighted
    by per-prediction `weights` (B, T-1) where given).

    Computed in float32, `chunk_size` positions at a time, so a 128k-entry vocabulary never needs a full-sequence
    float32 copy of both logits at once. Positions follow `hard_label_loss` (logits at t predict labels at t+1).
    """
    s = student_logits[:, :-1].reshape(-1, student_logits.size(-1))  # (N, V)
    t = teacher_logits[:, :-1].reshape(-1, teacher_logits.size(-1))
    kl = torch.cat([_kl_rows(s[i : i + chunk_size], t[i : i + chunk_size], temperature)
                    for i in range(0, s.size(0), chunk_size)])  # (N,)
    return _weighted_mean(kl.view(labels[:, 1:].shape), labels, weights, ignore_index) * temperature**2


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of tempered next-token distributions, float32, per row of logits (rows, V) -> (rows,)."""
    log_p_s = F.log_softmax(_exact(student) / temperature, dim=-1)
    log_p_t = F.log_softmax(_exact(teacher) / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def topk_soft_label_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`soft_label_loss` against a teacher known only by its k likeliest next tokens (B, T, k) and their
    log-probabilities at `temperature` (B, T, k), as a teacher-output cache keeps them: T² KL between the two
    distributions over those k tokens plus one bucket for all the rest (the teacher's tail mass, 1 − Σ p_k, against the
    student's). A lower bound of the full KL, equal to it at k = V; without the tail bucket a tempered student, which
    spreads its mass over the whole vocabulary, would be pushed to put it all on the k."""
    log_q = F.log_softmax(_exact(student_logits[:, :-1]) / temperature, dim=-1)  # (B, T-1, V)
    kl = _topk_kl(topk_ids[:, :-1].long(), _exact(topk_logprobs[:, :-1]), log_q)  # (B, T-1)
    return _weighted_mean(kl, labels, weights, ignore_index) * temperature**2


def _topk_kl(ids: torch.Tensor, log_p_k: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL over (the k tokens `ids`, the rest as one bucket) of the teacher's top-k log-probabilities `log_p_k` (..., k)
    from the student's log-probabilities `log_q` (..., V); per position (...)."""
    log_q_k = log_q.gather(-1, ids)
    p_k = log_p_k.exp()
    p_tail = (1 - p_k.sum(-1)).clamp_min(0)
    log_q_tail = torch.log1p(-log_q_k.exp().sum(-1).clamp_max(1 - 1e-7))
    return (p_k * (log_p_k - log_q_k)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail


def hidden_state_loss(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    mask: torch.Tensor | None = None,
    kind: str = "mse",
) -> torch.Tensor:
    """Mean over matched layers of a per-token distance between hidden states (B, T, C).

    `mse`: squared error divided by the teacher's mean square at that layer, so every layer weighs the same whatever
    the scale of its residual stream. `cosine`: 1 − cosine similarity per token.
    """
    if not student_hidden:
        return torch.zeros(())
    mask = None if mask is None else mask.float()  # (B, T)
    losses = []
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        s, t = _exact(s), _exact(t)
        if kind == "mse":
            per_token = (s - t).pow(2).mean(-1) / t.pow(2).mean().clamp_min(1e-12)  # (B, T)
        elif kind == "cosine":
            per_token = 1 - F.cosine_similarity(s, t, dim=-1)
        else:
            raise ValueError(f"hidden loss must be mse or cosine (got {kind!r})")
        losses.append(per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum().clamp_min(1))
    return torch.stack(losses).mean()


def layer_output_loss(student_out: torch.Tensor, teacher_in: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² / ‖t − x‖²: a layer's squared output error (B, T, C) against the teacher layer's, relative to the
    teacher layer's own change of the residual stream from its input x. Given the same input, that is the relative
    error of the layer's residual update; 1 is what skipping the layer would cost, so layers weigh alike."""
    s, t, x = _exact(student_out), _exact(teacher_out), _exact(teacher_in)
    return (s - t).pow(2).sum() / (t - x).pow(2).sum().clamp_min(1e-12)


# float32 logits of one chunk of positions, by device type (others: DEFAULT_CHUNK_BYTES). Smaller chunks re-read the
# output embeddings more often: on 2 CPU cores at SmolLM2's 49k vocabulary, 4 MiB chunks made a step 2x slower than
# whole logits, 32 MiB ones faster than them.
CHUNK_BYTES = {"cpu": 2**25}
DEFAULT_CHUNK_BYTES = 2**27  # on an accelerator larger chunks keep the matmuls efficient; ~8 such buffers at the peak


class _FusedOutputKD(torch.autograd.Function):
    """w_hard x `hard_label_loss` + w_soft x `soft_label_loss`, computed from the final hidden states and the output
    embeddings one chunk of positions at a time, each chunk's gradient formed in the forward (as Liger-Kernel's fused
    linear cross-entropy and JSD do): no (tokens x vocabulary) tensor is ever whole, only a chunk's few float32 ones.
    Logits are made in the weights' dtype — or, under autocast, in autocast's (`compute`: bf16 inputs, float32
    accumulation, as the models' own output layer runs there) — and then made float32, as the pure functions do;
    softmax, KL and the gradient's sum over chunks stay float32. Returns the weighted loss (differentiable) and the
    two terms (for the log)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, labels, w_hard, w_soft, temperature, rows, compute, weights):
        # hidden (N, C), weight (V, C), labels (N,): the next tokens; teacher: ("hidden", its final hidden states
        # (N, Ct), its output embeddings (V, Ct)) or ("topk", token ids (N, k), log-probabilities (N, k));
        # weights (N,) or None: each prediction's weight in the means
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute or weight.dtype)  # (V, C)
            kind, t_a, t_b = teacher
            if kind == "hidden":
                t_b = t_b.to(compute or t_b.dtype)  # (V, Ct)
            scale = (labels != IGNORE_INDEX).float()  # (N,): what each prediction counts for
            if weights is not None:
                scale = scale * weights.float()
            count = scale.sum().clamp_min(1 if weights is None else 1e-12)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            hard, soft = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
            for i in range(0, hidden.size(0), rows):
                h, keep = hidden[i : i + rows].to(w.dtype), scale[i : i + rows]
                target = labels[i : i + rows].clamp_min(0)
                logits = (h @ w.T).float()  # (rows, V)
                log_p = torch.log_softmax(logits, -1)
                hard = hard + (-log_p.gather(1, target[:, None]).squeeze(1) * keep).sum()
                grad = log_p.exp_().mul_(w_hard)  # d hard / d logits = softmax - onehot (before the mean)
                grad[torch.arange(len(target), device=grad.device), target] -= w_hard
                del log_p
                if w_soft:
                    log_q = torch.log_softmax(logits.div_(temperature), -1)  # the student's, tempered
                    chunk_b = t_b if kind == "hidden" else t_b[i : i + rows]  # weights whole, log-probs per row
                    p_t, kl = _teacher_kl(kind, t_a[i : i + rows], chunk_b, temperature, log_q)
                    soft = soft + (kl * keep).sum()
                    grad += log_q.exp_().sub_(p_t).mul_(w_soft * temperature)  # d T²KL / d logits = T (q - p)
                    del log_q, p_t
                del logits
                grad *= (keep / count)[:, None]
                if grad_hidden is not None:
                    grad_hidden[i : i + rows] = grad.to(w.dtype) @ w
                if grad_weight is not None and compute is None:
                    grad_weight.addmm_(grad.T, h.float())
                elif grad_weight is not None:  # the chunk's product at autocast's precision, summed in float32
                    grad_weight.add_(grad.T.to(compute) @ h)
            hard, soft = hard / count, soft * temperature**2 / count
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(hard, soft)
        return w_hard * hard + w_soft * soft, hard, soft

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, *[None] * 8


def _teacher_kl(kind: str, a: torch.Tensor, b: torch.Tensor, temperature: float,
               log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's tempered next-token distribution over a chunk of positions as the gradient sees it, float32
    (rows, V), and KL(teacher ‖ student) per position (rows,) against the student's tempered log-probabilities `log_q`
    (rows, V): the teacher from its final hidden states `a` and output embeddings `b`, or from its top-k token ids `a`
    and tempered log-probabilities `b` (`topk_soft_label_loss`: its tail mass is spread over the rest as the
    student spreads its own, which makes T (q − p) the coarse KL's gradient)."""
    if kind == "hidden":
        log_t = torch.log_softmax((a.to(b.dtype) @ b.T).float().div_(temperature), -1)  # (rows, V)
        p_t = log_t.exp()
        return p_t, (p_t * (log_t - log_q)).sum(-1)
    ids, log_p_k = a.long(), b.float()
    kl = _topk_kl(ids, log_p_k, log_q)
    q = log_q.exp()  # (rows, V)
    q_tail = (1 - q.gather(1, ids).sum(-1)).clamp_min(1e-7)
    p_tail = (1 - log_p_k.exp().sum(-1)).clamp_min(0)
    return q.mul_((p_tail / q_tail)[:, None]).scatter_(1, ids, log_p_k.exp()), kl


def fused_output_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    w_hard: float = 1.0,
    w_soft: float = 1.0,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_hard x hard + w_soft x soft, hard, soft) from final hidden states (B, T, C) and output embeddings (V, C) of
    student and teacher: the numbers of `hard_label_loss(hidden @ weight.T, labels)` and `soft_label_loss(...)`, and
    their gradients, holding about six float32 (chunk x vocabulary) tensors at a time instead of the whole batch's
    logits, log-probabilities and probabilities (which peak near 21 bytes per token x vocabulary entry). Under autocast
    the output matmuls run in its dtype, as the models' own layers do. With `teacher_topk` (token ids and their
    log-probabilities at `temperature`, each (B, T, k): a teacher-output cache's) in place of the teacher's hidden
    states and weights, the soft term is `topk_soft_label_loss`'s. `weights` (B, T-1): each prediction's weight in
    both terms' means (the pure functions' `weights`)."""
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    chunk_bytes = chunk_bytes or CHUNK_BYTES.get(hidden.device.type, DEFAULT_CHUNK_BYTES)
    rows = max(8, chunk_bytes // (4 * weight.shape[0]))
    flat = lambda x: x[:, :-1].reshape(-1, x.shape[-1])  # positions t predict labels t + 1
    teacher = (("topk", *(flat(x).detach() for x in teacher_topk)) if teacher_topk is not None
               else ("hidden", flat(teacher_hidden).detach(), teacher_weight.detach()))
    return _FusedOutputKD.apply(flat(hidden), weight, teacher, labels[:, 1:].reshape(-1), w_hard, w_soft, temperature,
                                rows, compute, None if weights is None else weights.reshape(-1).detach())


def output_weight(model) -> torch.Tensor | None:
    """The output embeddings (V, C) of a causal LM, unwrapped from DDP, where the fused loss can read them whole; None
    where it cannot (FSDP shards them, and a module with an output bias or another head is not a plain linear)."""
    model = getattr(model, "module", model)
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if getattr(head, "bias", None) is not None or weight is None or type(weight) is not torch.nn.Parameter:
        return None
    if tuple(weight.shape) != (model.config.vocab_size, model.config.hidden_size):
        return None
    return weight


NO_LOGITS = torch.empty(0, dtype=torch.long)  # `logits_to_keep`: no position's logits (the fused loss makes them)


def matched_hidden(hidden_states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The hidden states (B, T, C) the hidden-state loss matches, of a model's `output_hidden_states`: the outputs of
    decoder layers 1 … L−1 (the embeddings are identical, and the last layer's final-norm output is already pinned
    by the logit KL)."""
    return list(hidden_states[1:-1])


@dataclass(frozen=True)
class TeacherOutputs:
    """What the loss needs of the teacher for a batch, without running its layers (`teacher_cache.TeacherCache`'s):
    its final hidden states, from which its output embeddings make the exact logits, or its top-k next tokens."""

    hidden: list[torch.Tensor]  # `matched_hidden`: L−1 tensors (B, T, C)
    final: torch.Tensor | None = None  # (B, T, C) the final-norm output: the logits are final @ output embeddings
    topk_ids: torch.Tensor | None = None  # (B, T, k) else: the teacher's k likeliest next tokens
    topk_logprobs: torch.Tensor | None = None  # (B, T, k) their log-probabilities at `temperature`
    temperature: float | None = None


@dataclass(frozen=True)
class KDLoss:
    """The distillation objective: w_hard x cross-entropy + w_soft x T² KL(teacher ‖ student) + w_hidden x hidden-state
    distance at `matched_hidden`'s layers."""

    w_hard: float = 0.1
    w_soft: float = 1.0
    w_hidden: float = 1.0
    temperature: float = 2.0
    hidden_loss: str = "mse"

    def __call__(self, student, teacher, ids: torch.Tensor, fused: bool = True,
                 cached: TeacherOutputs | None = None, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term, unweighted, plus `loss` (the weighted sum) for one batch of windows (B, T). With `fused` (and
        output embeddings it can read whole: not under FSDP) the output terms come from `fused_output_kd`, so no
        full-batch logits exist; otherwise from the models' logits and the pure functions above (the same numbers).
        With `cached` the teacher's layers are not run: its kept final hidden states and its output embeddings give
        the soft term exactly (or its top-k log-probabilities, `topk_soft_label_loss`), its kept hidden states the
        hidden one. `weights` (B, T-1): each prediction's weight in the hard and soft terms (key-token weighting,
        `key_tokens.context_weights`); the hidden-state term stays a plain mean."""
        topk = cached is not None and cached.final is None
        if topk and cached.temperature != self.temperature:
            raise ValueError(f"the cached teacher outputs are at temperature {cached.temperature}, the loss at "
                             f"{self.temperature}")
        weight = output_weight(student) if fused else None
        t_weight = output_weight(teacher) if fused and not topk else None
        fused = weight is not None and (topk or t_weight is not None)
        kw = {"input_ids": ids, "use_cache": False, "output_hidden_states": fused or self.w_hidden > 0}
        if fused:
            kw["logits_to_keep"] = NO_LOGITS.to(ids.device)
        t_logits = None
        if cached is None:
            with torch.no_grad():
                t_out = teacher(**kw)
            t_logits = t_out.logits
            cached = TeacherOutputs(matched_hidden(t_out.hidden_states) if kw["output_hidden_states"] else [],
                                    t_out.hidden_states[-1] if fused else None)
        s_out = student(**kw)
        if fused:
            loss, hard, soft = fused_output_kd(
                s_out.hidden_states[-1], weight, cached.final, t_weight, ids, self.w_hard, self.w_soft,
                self.temperature, teacher_topk=(cached.topk_ids, cached.topk_logprobs) if topk else None,
                weights=weights)
            terms = {"hard": hard, **({"soft": soft} if self.w_soft > 0 else {})}
        else:
            terms = {"hard": hard_label_loss(s_out.logits, ids, weights=weights)}
            if self.w_soft > 0 and topk:
                terms["soft"] = topk_soft_label_loss(s_out.logits, cached.topk_ids, cached.topk_logprobs, ids,
                                                     self.temperature, weights=weights)
            elif self.w_soft > 0:
                if t_logits is None:  # from the cache: its final hidden states through the teacher's output layer
                    with torch.no_grad():
                        t_logits = teacher.get_output_embeddings()(cached.final)
                terms["soft"] = soft_label_loss(s_out.logits, t_logits, ids, self.temperature, weights=weights)
            loss = self.w_hard * terms["hard"] + self.w_soft * terms.get("soft", 0.0)
        if self.w_hidden > 0:
            terms["hidden"] = hidden_state_loss(matched_hidden(s_out.hidden_states), cached.hidden,
                                                kind=self.hidden_loss)
            loss = loss + self.w_hidden * terms["hidden"]
        terms["loss"] = loss
        return terms
