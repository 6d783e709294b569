"""Key tokens: the predictions that need the far context, found by the teacher (LongPPL, arXiv 2410.23771).

A token is *key* where the teacher's log-probability of it gains at least `KEY_GAIN` nats from the whole context
over its last `NEAR` tokens only (`NEAR / 2` to `NEAR` of them: predictions are truncated a chunk at a time). The
near context keeps the window's first `SINKS` tokens too: without those attention sinks a truncated teacher
collapses (on SmolLM2-135M a quarter of all tokens then look "key"). Only positions with at least `NEAR` tokens
before the near context (`FAR_FROM` on) count, so every key token had far context to gain from.

Perplexity on key tokens tracks what breaks first as attention is shared or dropped (lambada: reading from far back)
where plain perplexity, dominated by local prediction, hardly moves. The same gain weights distillation towards those
tokens (`context_weights`, `distill --w-long`).

The gain of a window depends only on the teacher and the window, so it is computed once and kept per window on disk
(`GainCache`, keyed like the teacher-output cache), for evaluation and training windows alike.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from echoatt.common import cache_dir, replaced_atomically
from echoatt.evaluation.metrics import token_nll
from echoatt.inputs.corpus import fingerprint
from echoatt.run.results import key_row
from echoatt.training.teacher_cache import window_file

NEAR = 64  # tokens of near context the teacher's prediction is compared against
SINKS = 4  # first tokens of the window the near-context pass keeps visible (attention sinks)
KEY_GAIN = 2.0  # nats the whole context must add to a token's log-probability for it to be key (LongPPL's α)
FAR_FROM = 2 * NEAR  # the first position scored: from here every prediction has at least NEAR tokens of far context
GAIN_CAP = 4.0  # nats: a prediction's distillation weight grows with its gain up to here (`context_weights`)


def near_chunks(seq_len: int, near: int = NEAR, sinks: int = SINKS) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The truncated contexts of a window of `seq_len` tokens: for each chunk of `near // 2` predictions whose whole
    context is longer than the window's first `sinks` tokens and the `near` tokens up to the chunk's last prediction,
    the positions of those tokens (C, sinks + near), and which predictions (first, end) the chunk is for. Prediction t
    (of token t + 1) then sees the sinks and the last `near - near // 2 + 1` to `near` tokens up to t; predictions
    before the first chunk see all of their context anyway."""
    chunk = max(1, near // 2)
    rows, spans = [], []
    for start in range(0, seq_len - 1, chunk):
        end = min(start + chunk, seq_len - 1)  # predictions start .. end - 1, of tokens start + 1 .. end
        if end - near > sinks:  # something is left out
            rows.append([*range(sinks), *range(end - near, end)])
            spans.append((start, end))
    return torch.tensor(rows, dtype=torch.long).view(-1, sinks + near), spans


@torch.no_grad()
def context_gain(model: torch.nn.Module, windows: torch.Tensor, near: int = NEAR, sinks: int = SINKS,
                 batch_size: int = 4) -> torch.Tensor:
    """log p(token | whole context) − log p(token | sinks + near context), in nats, of each prediction of (N, T)
    windows, float32 (N, T-1): entry t is about token t+1, as `metrics.token_nll` lays predictions out. The near
    context is a real truncation (LongPPL's), each chunk of predictions run on its own short input at its own
    positions (`near_chunks`): a banded attention mask would not do, as each layer widens what a position has seen."""
    full = token_nll(model, windows, batch_size)
    positions, spans = near_chunks(windows.shape[1], near, sinks)
    gain = torch.zeros_like(full)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = 4 * batch_size  # short inputs: more of them a pass
    for n, window in enumerate(windows):
        for first in range(0, len(positions), rows):
            pos = positions[first : first + rows]  # (c, sinks + near)
            ids = window[pos].to(device)  # a mask given: transformers would read the gaps in the positions as
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),  # packed sequences, the sinks cut off
                           position_ids=pos.to(device), use_cache=False).logits
            for row, (start, end) in enumerate(spans[first : first + rows]):
                own = end - start  # the chunk's predictions: the last `own` positions of its input
                near_nll = torch.nn.functional.cross_entropy(logits[row, -own:].float(), window[start + 1 : end + 1].to(device),
                                                             reduction="none").cpu()
                gain[n, start:end] = near_nll - full[n, start:end]
    model.train(was_training)
    return gain


def far_context(predictions: int, far_from: int = FAR_FROM, device: torch.device | str = "cpu") -> torch.Tensor:
    """Which of a window's `predictions` (T-1,) have far context: those of a token at position `far_from` or later
    (entry t predicts token t+1)."""
    return torch.arange(1, predictions + 1, device=device) >= far_from


def key_mask(gain: torch.Tensor, threshold: float = KEY_GAIN, far_from: int = FAR_FROM) -> torch.Tensor:
    """Which predictions (N, T-1) of `context_gain` are key tokens: a gain of at least `threshold` nats, with far
    context."""
    return (gain >= threshold) & far_context(gain.shape[1], far_from, gain.device)


def context_weights(gain: torch.Tensor, strength: float, cap: float = GAIN_CAP, far_from: int = FAR_FROM) -> torch.Tensor:
    """Per-prediction loss weights (..., T-1) from `context_gain`: 1 + strength × min(max(gain, 0), cap) where the
    prediction has far context (position `far_from` on), 1 elsewhere. Capped, as LongCE caps its weights: a token the
    near context predicts terribly is not worth unbounded weight. `strength` 0: every weight 1 (the plain loss)."""
    return 1 + strength * gain.clamp(0, cap) * far_context(gain.shape[-1], far_from, gain.device)


class GainCache:
    """`context_gain` per window of one teacher, kept on disk and computed only for windows not seen before."""

    def __init__(self, stamp: str, model: torch.nn.Module, near: int = NEAR, sinks: int = SINKS):
        weight = next(model.parameters())
        self.near, self.sinks = near, sinks
        self.folder = cache_dir() / "key-tokens" / fingerprint(stamp, near, sinks, weight.dtype, weight.device.type)

    @torch.no_grad()
    def gains(self, model: torch.nn.Module, windows: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """`context_gain` of (N, T) windows (N, T-1), read where kept, else computed a batch at a time and kept."""
        paths = [window_file(self.folder, w) for w in windows]
        have = {i: load_file(p)["gain"] for i, p in enumerate(paths) if p.is_file()}
        missing = [i for i in range(len(windows)) if i not in have]
        if missing:
            self.folder.mkdir(parents=True, exist_ok=True)
        for start in tqdm(range(0, len(missing), 4), desc="key tokens", disable=not progress or not missing,
                          leave=False):
            rows = missing[start : start + 4]
            fresh = context_gain(model, windows[rows], self.near, self.sinks)
            for row, i in enumerate(rows):
                have[i] = fresh[row].contiguous()
                with replaced_atomically(paths[i]) as tmp:
                    save_file({"gain": have[i]}, str(tmp))
        return torch.stack([have[i] for i in range(len(windows))])


def text_keys(stamp: str, model: torch.nn.Module, texts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key predictions (N, T-1) of each text's windows (N, T), by results row, found by the teacher `model`
    (kept per window: `GainCache`)."""
    cache = GainCache(stamp, model)
    return {row: key_mask(cache.gains(model, windows, progress=True)) for row, windows in texts.items()}


def text_perplexities(model: torch.nn.Module, texts: dict[str, torch.Tensor],
                      keys: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Perplexity of `model` on each text's windows and, where the text has key tokens, on those alone (its row
    `key_row`, with `percent`: the share of the predictions with far context, from `FAR_FROM` on, that are key)."""
    out = {}
    for row, windows in texts.items():
        nll = token_nll(model, windows)  # one pass gives both
        out[row] = {"perplexity": torch.exp(nll.mean()).item()}
        key = keys[row]  # (N, T-1), as `nll`
        if key.any():
            scored = len(key) * far_context(key.shape[1]).sum().item()
            out[key_row(row)] = {"perplexity": torch.exp(nll[key].mean()).item(),
                                 "percent": 100 * key.sum().item() / scored, "near": NEAR, "gain": KEY_GAIN}
    return out
