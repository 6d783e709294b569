"""Quality measures shared by distillation and evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def token_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Next-token negative log-likelihood of every prediction of (N, T) token windows, float32 (N, T-1): entry t is
    the model's NLL of token t+1."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        # (B*T, V) rows: on a (B, V, T) layout cross_entropy sums less exactly (4e-5 of a real model's NLL)
        out.append(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1).cpu())
    model.train(was_training)
    return torch.cat(out)


def nll_sum(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over (N, T) token windows, and how many tokens it covers."""
    nll = token_nll(model, windows, batch_size, progress)
    return nll.sum().item(), nll.numel()


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over (N, T) token windows, every window scored in full."""
    total, count = nll_sum(model, windows, batch_size, progress)
    return math.exp(total / count)


def repeated_tokens(sequences: int, period: int, vocab_size: int, seed: int = 0,
                    exclude: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """The retrieval probe: (sequences, 2 * period) windows of random tokens, each half the same. The second half can
    be predicted only by finding the current token earlier in the context and copying what followed it (what
    induction heads do), so it measures retrieval from context with no task and no corpus."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(exclude)] = False
    ids = allowed.nonzero().squeeze(1)  # (allowed tokens,)
    generator = torch.Generator().manual_seed(seed)
    half = ids[torch.randint(len(ids), (sequences, period), generator=generator)]  # (N, P)
    return torch.cat([half, half], dim=1)


@torch.no_grad()
def retrieval(model: torch.nn.Module, probe: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token NLL and top-1 accuracy on the repeated half of `repeated_tokens` windows (N, 2P)."""
    device = next(model.parameters()).device
    period = probe.shape[1] // 2
    nll, hits, count = 0.0, 0, 0
    for start in range(0, len(probe), batch_size):
        ids = probe[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, period:-1].float()  # predicts tokens P+1 .. 2P-1
        target = ids[:, period + 1 :]
        nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum").item()
        hits += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return {"nll": nll / count, "accuracy": hits / count}
