"""Distillation losses as pure functions (like torchtune's `kd_losses.py`), each tested against its formula, and
`KDLoss`, the weighted objective that distillation (and the benchmark's distillation step) computes with them.

All reduce to a mean over valid positions: those whose label is not `ignore_index` (hard and soft labels) or whose
attention-mask entry is 1 (hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _exact(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 at least (bf16 logits lose the small differences KL is made of; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def hard_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one (`reduction="sum"` for
    perplexity over many batches)."""
    logits = _exact(logits[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def soft_label_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of temperature-scaled next-token distributions, mean over valid positions.

    Computed in float32, `chunk_size` positions at a time, so a 128k-entry vocabulary never needs a full-sequence
    float32 copy of both logits at once. Positions follow `hard_label_loss` (logits at t predict labels at t+1).
    """
    s = student_logits[:, :-1].reshape(-1, student_logits.size(-1))  # (N, V)
    t = teacher_logits[:, :-1].reshape(-1, teacher_logits.size(-1))
    valid = (labels[:, 1:] != ignore_index).reshape(-1)  # (N,)
    total = _exact(s.new_zeros(()))
    for i in range(0, s.size(0), chunk_size):
        keep = valid[i : i + chunk_size]
        log_p_s = F.log_softmax(_exact(s[i : i + chunk_size]) / temperature, dim=-1)
        log_p_t = F.log_softmax(_exact(t[i : i + chunk_size]) / temperature, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (chunk,)
        total = total + (kl * keep).sum()
    return total * temperature**2 / valid.sum().clamp_min(1)


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


@dataclass(frozen=True)
class KDLoss:
    """The distillation objective: w_hard x cross-entropy + w_soft x T² KL(teacher ‖ student) + w_hidden x hidden-state
    distance. Hidden states are matched at the outputs of decoder layers 1 … L−1: the embeddings are identical, and
    the last layer's (final-norm) output is already pinned by the logit KL."""

    w_hard: float = 0.1
    w_soft: float = 1.0
    w_hidden: float = 1.0
    temperature: float = 2.0
    hidden_loss: str = "mse"

    def __call__(self, student, teacher, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term, unweighted, plus `loss` (the weighted sum) for one batch of windows (B, T)."""
        want_hidden = self.w_hidden > 0
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=want_hidden, use_cache=False)
        s_out = student(input_ids=ids, output_hidden_states=want_hidden, use_cache=False)
        terms = {"hard": hard_label_loss(s_out.logits, ids)}
        if self.w_soft > 0:
            terms["soft"] = soft_label_loss(s_out.logits, t_out.logits, ids, self.temperature)
        if want_hidden:
            layers = slice(1, len(t_out.hidden_states) - 1)
            terms["hidden"] = hidden_state_loss(
                list(s_out.hidden_states[layers]), list(t_out.hidden_states[layers]), kind=self.hidden_loss
            )
        weights = {"hard": self.w_hard, "soft": self.w_soft, "hidden": self.w_hidden}
        terms["loss"] = sum(weights[k] * v for k, v in terms.items())
        return terms
