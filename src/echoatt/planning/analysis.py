"""How alike are the attention maps of a model's layers and heads?

All similarities come from one Gram matrix G over (layer, head) pairs: G[(i,h),(j,g)] = <P_i^h, P_j^g>, summed over
sequences, queries and keys, where P_i^h is head h's attention-probability matrix at layer i (causal part: the
softmax puts exact zeros above the diagonal). From G:
- head_head[i,h,j,g] = cosine of P_i^h and P_j^g (what head matching needs);
- same_head[i,j,h]   = head_head[i,h,j,h];
- head_avg[i,j]      = cosine of the head-averaged maps, since <sum_h P_i^h, sum_g P_j^g> = sum_hg G;
- head_matched[i,j]  = mean over i's heads h of max_g head_head[i,h,j,g]: how well layer i's heads are served by
  the best-matching heads of layer j (the head-matched copy's similarity).

Memory stays bounded: the model runs once per batch with hooks keeping only each attention's *input*; then the
probabilities are recomputed one layer at a time for a chunk of query rows, so at most (layers x chunk) rows of
probabilities exist at once, never L x B x H x T x T.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.models.llama.modeling_llama import repeat_kv

from echoatt.model.modeling_echoatt import project_qk

DECIMALS = 5  # similarities are saved to this many decimals
CHUNK_BYTES = 256 * 2**20  # budget for one chunk of probability rows over all layers
RETRIEVAL_HEAD = 0.1  # induction score from which the summary and heatmap call a head one that retrieves


@dataclass
class Similarity:
    """Layer x layer and head x head attention similarity of one model on some text."""

    head_head: np.ndarray  # (L, H, L, H) cosine
    head_avg: np.ndarray  # (L, L) cosine of head-averaged maps
    tokens: int
    settings: dict = field(default_factory=dict)
    induction: np.ndarray | None = None  # (L, H) `induction_scores`: the heads that retrieve from context
    redundancy: np.ndarray | None = None  # (L,) `attention_redundancy`: LLM-Drop's criterion

    @property
    def num_layers(self) -> int:
        return self.head_head.shape[0]

    def fingerprint(self) -> str:
        """What the head maps come from, for caches of anything built with them: a hash of the head x head
        similarities at the precision they are saved with (the same before and after a save and load)."""
        saved = np.round(np.asarray(self.head_head, dtype=np.float64), DECIMALS)
        return hashlib.sha256(np.ascontiguousarray(saved).tobytes()).hexdigest()[:16]

    @property
    def same_head(self) -> np.ndarray:  # (L, L, H)
        return np.einsum("ihjh->ijh", self.head_head)

    @property
    def head_matched(self) -> np.ndarray:  # (L, L): layer i's heads vs the best-matching heads of layer j
        return self.head_head.max(axis=3).mean(axis=1)

    def head_map(self, follower: int, leader: int, kv_groups: int = 0) -> list[int]:
        """For each follower head, the leader head whose attention map is most similar to its own. With `kv_groups`
        (query heads per KV head), only among the leader heads of its own KV group: the follower then keeps GQA on
        fused kernels (no K gathered, no V repeated)."""
        sim = self.head_head[follower, :, leader, :]  # (H follower heads, H leader heads)
        if kv_groups:
            group = np.arange(sim.shape[0]) // kv_groups
            sim = np.where(group[:, None] == group[None, :], sim, -np.inf)
        return [int(g) for g in sim.argmax(axis=-1)]

    def to_json(self) -> dict:
        r = lambda a: np.round(a, DECIMALS).tolist()
        return {
            "num_layers": self.num_layers,
            "num_heads": self.head_head.shape[1],
            "tokens": self.tokens,
            "settings": self.settings,
            "head_avg": r(self.head_avg),
            "head_matched": r(self.head_matched),
            "same_head": r(self.same_head),
            "head_head": r(self.head_head),
            "induction": None if self.induction is None else r(self.induction),
            "redundancy": None if self.redundancy is None else r(self.redundancy),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Similarity:
        data = json.loads(Path(path).read_text())
        optional = {k: np.array(data[k]) for k in ("induction", "redundancy") if data.get(k) is not None}
        return cls(np.array(data["head_head"]), np.array(data["head_avg"]), data["tokens"], data.get("settings", {}),
                   **optional)

    def summary(self, top: int = 5) -> str:
        """A few lines a person reads: adjacent-layer similarity and the most / least alike pairs."""
        L = self.num_layers
        avg, matched, same = self.head_avg, self.head_matched, self.same_head
        adj = [(i, avg[i, i + 1], matched[i + 1, i], same[i, i + 1].mean()) for i in range(L - 1)]
        off = [(avg[i, j], i, j) for i in range(L) for j in range(i + 1, L)]
        off.sort(reverse=True)
        lines = ["adjacent layers i,i+1: head-avg / head-matched / same-head (mean over heads)"]
        lines += [f"  {i:2d},{i + 1:2d}: {a:.3f} / {m:.3f} / {s:.3f}" for i, a, m, s in adj]
        lines.append("most alike pairs (head-avg): " + ", ".join(f"{i}-{j} {v:.3f}" for v, i, j in off[:top]))
        lines.append("least alike pairs (head-avg): " + ", ".join(f"{i}-{j} {v:.3f}" for v, i, j in off[-top:]))
        if self.induction is not None:
            heads = [(i, h, v) for (i, h), v in np.ndenumerate(self.induction) if v >= RETRIEVAL_HEAD]
            lines.append(f"heads that retrieve from context (induction score >= {RETRIEVAL_HEAD}): "
                         + (", ".join(f"{i}.{h} {v:.2f}" for i, h, v in heads) or "none"))
        return "\n".join(lines)

    def heatmap(self, path: str | Path) -> None:
        """Head-averaged, head-matched and same-head similarity as three layer x layer heatmaps, and beside them
        (where measured) each head's induction score: the heads that retrieve from context."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            ("head-averaged", self.head_avg),
            ("head-matched (row reads column)", self.head_matched),
            ("same head (mean over heads)", self.same_head.mean(axis=-1)),
        ]
        L = self.num_layers
        extra = self.induction is not None
        fig, axes = plt.subplots(1, 3 + extra, figsize=(18 + 4 * extra, 6), constrained_layout=True,
                                 width_ratios=[1, 1, 1] + [0.5] * extra)
        ticks = list(range(0, L, max(1, L // 15)))
        for ax, (title, mat) in zip(axes, panels):
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", origin="upper")
            ax.set_title(f"{title}")
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
        fig.colorbar(im, ax=axes[:3], shrink=0.8, label="cosine similarity of attention maps")
        if extra:
            ax = axes[3]
            ind = ax.imshow(self.induction, vmin=0, vmax=1, cmap="magma", origin="upper", aspect="auto")
            ax.set_title("retrieval from context\n(induction score per head)")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_yticks(ticks)
            fig.colorbar(ind, ax=ax, shrink=0.8, label="attention on the token after the earlier occurrence")
        fig.suptitle(f"Attention similarity ({self.tokens:,} tokens)")
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _capture_inputs(model: torch.nn.Module) -> tuple[list, list[torch.utils.hooks.RemovableHandle]]:
    """Hooks that keep each attention module's input (B, T, C) and position embeddings for one forward."""
    captured: list = []

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        captured.append((module, hidden, kwargs["position_embeddings"]))

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    return captured, handles


def _probability_rows(attn, hidden, position_embeddings, q0: int, q1: int, qk_cache: dict) -> torch.Tensor:
    """Softmax rows q0..q1 of one layer's causal attention, keys 0..q1: (B, H, q1 - q0, q1)."""
    if attn not in qk_cache:
        q, k = project_qk(attn, hidden, position_embeddings)  # (B, H, T, D), (B, Hkv, T, D)
        qk_cache[attn] = (q, repeat_kv(k, attn.num_key_value_groups))
    q, k = qk_cache[attn]
    scores = torch.matmul(q[:, :, q0:q1].float(), k[:, :, :q1].float().transpose(2, 3)) * attn.scaling
    rows = torch.arange(q0, q1, device=scores.device)[:, None]
    cols = torch.arange(q1, device=scores.device)[None, :]
    scores = scores.masked_fill(cols > rows, float("-inf"))
    return torch.softmax(scores, dim=-1)


@torch.no_grad()
def attention_similarity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True, settings: dict | None = None
) -> Similarity:
    """Similarity of every (layer, head) pair of a supported family's attention over `windows` (N, T) of tokens."""
    config = model.config
    L, H = config.num_hidden_layers, config.num_attention_heads
    device = next(model.parameters()).device
    gram = torch.zeros(L * H, L * H, dtype=torch.float64, device=device)
    captured, handles = _capture_inputs(model)
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="attention similarity", disable=not progress):
            ids = windows[start : start + batch_size].to(device)
            B, T = ids.shape
            captured.clear()
            model.model(input_ids=ids, use_cache=False)
            chunk = max(1, CHUNK_BYTES // (L * B * H * T * 4))
            qk_cache: dict = {}
            for q0 in range(0, T, chunk):
                q1 = min(T, q0 + chunk)
                rows = torch.stack([_probability_rows(a, x, pe, q0, q1, qk_cache) for a, x, pe in captured])
                flat = rows.transpose(1, 2).reshape(L * H, -1)  # (L*H, B*(q1-q0)*q1)
                gram += (flat @ flat.T).double()
    finally:
        for h in handles:
            h.remove()
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    head_head = (gram / norms[:, None] / norms[None, :]).view(L, H, L, H)
    avg_gram = gram.view(L, H, L, H).sum(dim=(1, 3))  # (L, L): <sum_h P_i^h, sum_g P_j^g>
    avg_norm = avg_gram.diagonal().sqrt()
    head_avg = avg_gram / avg_norm[:, None] / avg_norm[None, :]
    return Similarity(head_head.cpu().numpy(), head_avg.cpu().numpy(), int(windows.numel()), settings or {})


@torch.no_grad()
def induction_scores(model: torch.nn.Module, probe: torch.Tensor) -> np.ndarray:
    """(L, H): how much each head retrieves from context — its mean attention, from each query in the repeated half of
    `metrics.repeated_tokens` windows (N, 2P), on the token that followed the query token's earlier occurrence
    (induction heads, Olsson et al. 2022). Near 0 for most heads; the heads near 1 are the ones copying must keep."""
    device = next(model.parameters()).device
    period = probe.shape[1] // 2
    captured, handles = _capture_inputs(model)
    try:
        model.model(input_ids=probe.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    queries = torch.arange(period, 2 * period, device=device)
    scores = []
    for attn, hidden, pe in captured:
        rows = _probability_rows(attn, hidden, pe, period, 2 * period, {})  # (N, H, P, 2P)
        scores.append(rows[:, :, queries - period, queries - period + 1].mean(dim=(0, 2)))  # (H,)
    return torch.stack(scores).cpu().numpy()


@torch.no_grad()
def attention_redundancy(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """(L,): LLM-Drop's criterion (arXiv 2406.15786) for dropping attention sub-layers — the mean cosine similarity,
    over tokens of `windows` (N, T), of each layer's residual stream before its attention and after adding the
    attention's output. Near 1: the attention changes its input least, so it is the first to drop."""
    device = next(model.parameters()).device
    inputs: dict[int, torch.Tensor] = {}
    sums = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: sums.__setitem__(i, sums[i] + torch.nn.functional.cosine_similarity(
                inputs[i].float(), (inputs[i] + out[0]).float(), dim=-1).sum().item())))
    try:
        for start in range(0, len(windows), batch_size):
            model.model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return (sums / windows.numel()).numpy()
