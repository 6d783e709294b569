"""Quality measures shared by distillation and evaluation."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from echoatt.losses import hard_label_loss


@torch.no_grad()
def nll_sum(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over (N, T) token windows, and how many tokens it covers."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        total += hard_label_loss(model(input_ids=ids, use_cache=False).logits, ids, reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total, count


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over (N, T) token windows, every window scored in full."""
    total, count = nll_sum(model, windows, batch_size, progress)
    return math.exp(total / count)
