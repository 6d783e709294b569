"""The shared-attention student: a LLaMA-shaped decoder whose *follower* layers reuse an earlier layer's attention.

One file on purpose (like transformers' `modeling_llama.py`): it imports only torch and transformers, so
`save_pretrained` can copy it beside a checkpoint and `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where echoatt is not installed. With echoatt imported, no remote code is needed.

Followers come in two types (`follower_type`):
- `copy` (EchoAtt): no `q_proj`/`k_proj`; head h applies the attention of leader head `head_map[h]` to its own
  values, then its own `o_proj`.
- `lisa` (LiSA, arXiv 2408.01890): the logits are `align(source_logits) + Q_r K_r^T / sqrt(r)`, where `align` mixes
  the source layer's heads at every (query, key) position (`HeadAlign`) and Q_r, K_r are rank-r projections of the
  follower's own input with RoPE (`LowRankQK`); then the usual mask, softmax, own V and O. A LiSA follower reads the
  layer just before it, which may itself be a LiSA follower (a chain).

A layer hands its attention on through a per-forward dict (`attention_handoff`, a `Handoff` per source layer) that
travels with the layers' keyword arguments, so nothing is kept on the modules between calls. What it hands over
depends on the path (`reuse_path`):
- `probs` (reuse path): the leader materialises its probabilities P (B, H, Tq, Tk); a copy follower computes
  P[:, head_map] @ V as one grouped matmul per KV head (no K read, no V copy). Always used on eager attention; on
  fused backends `auto` uses it while a call has at most `reuse_crossover` new tokens (decode), because there P is
  a row per head and reading it is cheaper than re-reading K.
- `qk` (fused path): the leader hands over its post-RoPE Q (B, H, Tq, D) and K (B, Hkv, Tk, D); a follower calls the
  same attention kernel (SDPA, flash, flex) on (Q[:, head_map], K, V), so no Tq x Tk matrix is stored. Used for
  long calls (prefill, training) where materialising P costs more than the QK^T it saves.
A LiSA follower's source always hands over its logits (scaled QK^T before the mask).

Followers keep only V in the KV cache (LiSA followers also their rank-r keys): a copy follower's key slot is a
(B, Hkv, T, 0) tensor, zero bytes that still count tokens.

The baseline a user would pick instead, *attention drop*, is the same model with `attention_source[i] = -1`: layer i
has no attention sub-layer at all (no Q/K/V/O weights, nothing cached), only its MLP; with -2 its attention is one
fitted (C x C) matrix of its normed input (`linear_attn`: Puzzle's "linear attention"), nothing cached either. Each
layer's FFN has the width `intermediate_sizes[i]` says: the teacher's, its most important channels, or none.

Each layer's attention is one small class for its role (`EchoAttConfig.role`): `EchoAttAttention` (ordinary layers and
leaders), `CopyFollowerAttention`, `LisaFollowerAttention`, `DroppedAttention`, `LinearAttention`; weight names are
LLaMA's (and DeciLM's `self_attn.linear_attn` for the linear map).

The config and the teacher's family are `configuration_echoatt.py`'s.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_echoatt import EchoAttConfig  # relative: beside a checkpoint too (remote code)

HANDOFF_KEY = "attention_handoff"
# The keyword transformers passes the KV cache under: `cache` from 5.24, `past_key_values` before. Read from Llama's
# own signature (tests fail if neither is there) so callers pass what the installed version expects, unwarned.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(outputs) -> Cache | None:
    """The KV cache of a model output: field `cache` from transformers 5.24, `past_key_values` before."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


def project_qk(attn: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries (B, H, T, D) and keys (B, Hkv, T, D) of any family's attention module, the student's or a
    teacher's own: Q and K projections, Qwen3's per-head RMSNorm where the module has one, then RoPE."""
    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    query, key = attn.q_proj(hidden_states).view(shape), attn.k_proj(hidden_states).view(shape)  # (B, T, H|Hkv, D)
    if getattr(attn, "q_norm", None) is not None:
        query, key = attn.q_norm(query), attn.k_norm(key)
    return apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *position_embeddings)


class Handoff(NamedTuple):
    """What a layer passes to the layers that read it; fields the path does not use stay None."""

    probs: torch.Tensor | None = None  # (B, H, Tq, Tk) attention probabilities (reuse path)
    query: torch.Tensor | None = None  # (B, H, Tq, D) post-RoPE queries (fused path)
    key: torch.Tensor | None = None  # (B, Hkv, Tk, D) post-RoPE keys, cache included (fused path)
    logits: torch.Tensor | None = None  # (B, H, Tq, Tk) scaled QK^T before the mask (for LiSA followers)
    gathered: dict[tuple[int, ...], torch.Tensor] | None = None  # probs[:, head_map] by map, shared by its followers


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, H, Tq, D) x (B, Hkv, Tk, D) -> (B, H, Tq, Tk): one matmul per KV head, K never repeated. The queries are
    scaled, not the scores: in decode Q is one row per head, the scores a row as long as the context."""
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    q = (query * scaling).reshape(b, hkv, (h // hkv) * tq, d)  # heads are KV-major: head i uses KV head i // (H / Hkv)
    return torch.matmul(q, key.transpose(-1, -2)).view(b, h, tq, tk)


def grouped_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(B, H, Tq, Tk) x (B, Hkv, Tk, D) -> (B, Tq, H, D): one matmul per KV head, V never repeated."""
    b, h, tq, tk = probs.shape
    hkv = value.shape[1]
    out = torch.matmul(probs.reshape(b, hkv, (h // hkv) * tq, tk), value)  # (B, Hkv, G*Tq, D)
    return out.view(b, h, tq, -1).transpose(1, 2)


def masked_softmax(
    logits: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype, top_left: bool = False
) -> torch.Tensor:
    """Softmax over keys of (B, H, Tq, Tk) logits under any mask transformers builds: boolean (True = attend), additive
    float, a 2-D (B, Tk) padding mask (flash attention), or None: causal, aligned as the backend's own causal flag
    aligns it — bottom-right (the new tokens last: flash) or, with `top_left`, top-left (SDPA's `is_causal`, which
    transformers relies on for a static cache's prefill, whose keys past the prompt are empty slots)."""
    tq, tk = logits.shape[-2:]
    exact = torch.promote_types(logits.dtype, torch.float32)  # at least float32, as eager attention
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
        return torch.softmax(logits + attention_mask[..., :tk], dim=-1, dtype=exact).to(dtype)
    keep = None
    if attention_mask is None or attention_mask.dim() == 2:
        if tq > 1:
            keep = torch.ones(tq, tk, dtype=torch.bool, device=logits.device).tril(0 if top_left else tk - tq)
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :tk].bool()  # (B, 1, 1, Tk)
            keep = pad if keep is None else pad & keep
    else:
        keep = attention_mask[..., :tk]
    if keep is not None:
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=exact).to(dtype)


class HeadAlign(nn.Module):
    """LiSA's tiny head-alignment network, applied at every (query, key) position over the head axis:
    align(x) = mix x + up(silu(down x)). `mix` starts as the one-hot head map and `up` as zero, so a new follower is
    exactly the head-matched copy; `mix` lets training re-weight heads linearly, the MLP adds what is not linear."""

    def __init__(self, heads: int, hidden: int, head_map: list[int]):
        super().__init__()
        self.head_map = head_map
        self.mix = nn.Parameter(torch.empty(heads, heads))  # (H_out, H_in)
        self.down = nn.Parameter(torch.empty(hidden, heads))
        self.up = nn.Parameter(torch.empty(heads, hidden))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, H, Tq, Tk) -> (B, H, Tq, Tk)
        out = torch.einsum("gh,bhqk->bgqk", self.mix, logits)
        hidden = nn.functional.silu(torch.einsum("eh,bhqk->beqk", self.down, logits))
        return out + torch.einsum("ge,beqk->bgqk", self.up, hidden)


class LowRankQK(nn.Module):
    """LiSA's low-rank logit correction: rank-r queries (H heads) and keys (Hkv heads) of the follower's own input,
    with RoPE on r frequencies spread evenly over the head's. `query` starts at zero (the correction is off)."""

    def __init__(self, config: EchoAttConfig):
        super().__init__()
        r, d = config.lisa_rank, config.head_dim
        self.rank = r
        self.query = nn.Parameter(torch.empty(config.num_attention_heads * r, config.hidden_size))
        self.key = nn.Parameter(torch.empty(config.num_key_value_heads * r, config.hidden_size))
        freqs = torch.linspace(0, d // 2 - 1, r // 2).round().long().tolist()
        self.rope_dims = freqs + [f + d // 2 for f in freqs]  # rotate_half pairs dim i with i + r/2, as in the head

    def forward(self, x: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = nn.functional.linear(x, self.query).view(b, t, -1, self.rank).transpose(1, 2)  # (B, H, T, r)
        k = nn.functional.linear(x, self.key).view(b, t, -1, self.rank).transpose(1, 2)  # (B, Hkv, T, r)
        cos, sin = (e[..., self.rope_dims] for e in position_embeddings)
        return apply_rotary_pos_emb(q, k, cos, sin)


class AttentionBase(nn.Module):
    """What every role shares: shapes, the KV-cache write, the attention kernel, and V and O where the layer has them.
    Weight names are LLaMA's (`q_proj`, `k_proj`, `v_proj`, `o_proj`), so checkpoints load unchanged."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.source = config.attention_source[layer_idx]
        self.is_leader = config.is_leader(layer_idx)
        self.hands_logits = self.is_leader and config.follower_type == "lisa"
        readers = [i for i, source in enumerate(config.attention_source) if source == self.source and i != source]
        self.last_reader = bool(readers) and layer_idx == readers[-1] and self.source != layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, C)
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Llama's attention signature; each role's `attend` does the work. The KV cache comes as `cache` from
        transformers 5.24 and as `past_key_values` before."""
        return self.attend(hidden_states, position_embeddings, attention_mask,
                           cache if cache is not None else past_key_values, kwargs)

    def _values(self, config: EchoAttConfig) -> None:
        out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=out_bias)

    def _interface(self) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)

    def _cache_update(self, cache: Cache | None, key: torch.Tensor, value: torch.Tensor, kwargs: dict):
        """As Llama does: the cache gets the call's kwargs (paged caches for continuous batching read them)."""
        return (key, value) if cache is None else cache.update(key, value, self.layer_idx, kwargs=kwargs)

    def _handoff(self, kwargs: dict) -> dict[int, Handoff]:
        handoff = kwargs.pop(HANDOFF_KEY, None)
        if handoff is None:
            raise RuntimeError("shared attention needs the model's forward (it passes the leader's attention on)")
        return handoff

    def _read_source(self, handoff: dict[int, Handoff]) -> Handoff:
        """What this follower's source handed on. The last reader of a source takes it out of the dict in inference,
        so a leader's (B, H, Tq, Tk) probabilities are freed as soon as no layer needs them (with gradients autograd
        keeps them anyway, and a checkpointed follower recomputed in backward must find them again)."""
        if self.last_reader and not torch.is_grad_enabled():
            return handoff.pop(self.source)
        return handoff[self.source]

    def _materialised(self, logits, attention_mask, value, handoff: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax of (B, H, Tq, Tk) logits, then P @ V; a leader hands P (and its logits, for LiSA) on."""
        probs = masked_softmax(logits, attention_mask, value.dtype, self.config._attn_implementation == "sdpa")
        probs = nn.functional.dropout(probs, self.attention_dropout if self.training else 0.0, self.training)
        if self.is_leader:
            handoff[self.layer_idx] = Handoff(probs=probs, logits=logits if self.hands_logits else None, gathered={})
        return grouped_values(probs, value), probs

    def _out(self, attn_output: torch.Tensor, input_shape) -> torch.Tensor:  # (B, T, H, D) -> (B, T, C)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


class EchoAttAttention(AttentionBase):
    """An ordinary layer's attention (LLaMA's), or a leader's: the same, and it hands its attention on."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self._values(config)

    def reuse_probs(self, new_tokens: int, attention_mask) -> bool:
        """Whether this leader hands over probabilities (reuse path) rather than Q and K (fused path)."""
        eager = self.config._attn_implementation == "eager"
        if not eager and not isinstance(attention_mask, torch.Tensor | None):  # e.g. flex attention's BlockMask
            return False
        return self.config.reuse_probs(new_tokens, eager)

    def attend(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None, kwargs: dict):
        handoff = self._handoff(kwargs) if self.is_leader else kwargs.pop(HANDOFF_KEY, None)
        input_shape = hidden_states.shape[:-1]
        query, key = project_qk(self, hidden_states, position_embeddings)  # (B, H, T, D), (B, Hkv, T, D)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        key, value = self._cache_update(cache, key, value, kwargs)
        eager = self.config._attn_implementation == "eager"
        # Materialise here (rather than call the backend's kernel) where LiSA followers need logits, or where a leader
        # on a fused backend hands probabilities on; on eager the kernel itself returns them.
        if self.hands_logits or (self.is_leader and not eager and self.reuse_probs(input_shape[1], attention_mask)):
            attn_output, attn_weights = self._materialised(
                grouped_scores(query, key, self.scaling), attention_mask, value, handoff)
        else:
            dropout = self.attention_dropout if self.training else 0.0
            attn_output, attn_weights = self._interface()(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
            if self.is_leader:
                handoff[self.layer_idx] = (Handoff(probs=attn_weights, gathered={}) if eager
                                           else Handoff(query=query, key=key))
        return self._out(attn_output, input_shape), attn_weights


class CopyFollowerAttention(AttentionBase):
    """EchoAtt's follower: no Q/K; head h applies leader head `head_map[h]`'s attention to its own V, then its O."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        groups = self.num_key_value_groups
        self.head_map = list(config.head_map[layer_idx] or range(self.num_heads))
        self.identity_map = self.head_map == list(range(self.num_heads))
        self.key_map = [g // groups for g in self.head_map]  # source KV head behind each source head read
        self.value_map = [h // groups for h in range(self.num_heads)]  # own KV head of each own head
        # Where every head reads a source head of its own KV group, the kernel keeps GQA; otherwise it gets K gathered
        # and V repeated to H heads, so it must not repeat them again.
        self.group_aligned = self.key_map == self.value_map
        self.num_key_value_groups = groups if self.group_aligned else 1
        self._index_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._values(config)

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._index_cache:
            self._index_cache[device] = tuple(
                torch.tensor(m, device=device) for m in (self.head_map, self.key_map, self.value_map)
            )
        return self._index_cache[device]

    def attend(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None, kwargs: dict):
        lead = self._read_source(self._handoff(kwargs))
        input_shape = hidden_states.shape[:-1]
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        no_keys = value.new_empty((*value.shape[:-1], 0))  # (B, Hkv, T, 0): counts tokens, stores nothing
        _, value = self._cache_update(cache, no_keys, value, kwargs)
        head_index, key_index, value_index = self._indices(value.device)
        if lead.probs is not None:  # reuse path
            # In inference, followers with the same head map gather P once between them; with gradients each gathers
            # its own (a checkpointed follower recomputed in backward must save what it saved in forward).
            gathered = {} if lead.gathered is None or torch.is_grad_enabled() else lead.gathered
            if not self.identity_map and tuple(self.head_map) not in gathered:
                gathered[tuple(self.head_map)] = lead.probs.index_select(1, head_index)
            probs = lead.probs if self.identity_map else gathered[tuple(self.head_map)]
            return self._out(grouped_values(probs, value), input_shape), probs
        query = lead.query if self.identity_map else lead.query.index_select(1, head_index)  # (B, H, Tq, D)
        key = lead.key
        if not self.group_aligned:
            key, value = key.index_select(1, key_index), value.index_select(1, value_index)  # (B, H, Tk, D)
        dropout = self.attention_dropout if self.training else 0.0
        attn_output, attn_weights = self._interface()(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )
        return self._out(attn_output, input_shape), attn_weights


class LisaFollowerAttention(AttentionBase):
    """LiSA's follower: logits = align(the layer before's logits) + rope(Q_r) rope(K_r)^T / sqrt(r), then the mask,
    softmax, its own V and O. It may itself be read by the next LiSA follower (a chain)."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        head_map = list(config.head_map[layer_idx] or range(self.num_heads))
        self.align = HeadAlign(self.num_heads, config.lisa_hidden, head_map)
        self.lowrank = LowRankQK(config)
        self._values(config)

    def attend(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None, kwargs: dict):
        handoff = self._handoff(kwargs)
        input_shape = hidden_states.shape[:-1]
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        query, key = self.lowrank(hidden_states, position_embeddings)  # (B, H, T, r), (B, Hkv, T, r)
        key, value = self._cache_update(cache, key, value, kwargs)
        logits = self.align(self._read_source(handoff).logits) + grouped_scores(query, key, self.lowrank.rank**-0.5)
        attn_output, attn_weights = self._materialised(logits, attention_mask, value, handoff)
        return self._out(attn_output, input_shape), attn_weights


class DroppedAttention(AttentionBase):
    """The baseline a user would pick instead: no attention sub-layer at all (no weights, nothing cached)."""

    def attend(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None, kwargs: dict):
        kwargs.pop(HANDOFF_KEY, None)
        empty = hidden_states.new_empty((hidden_states.shape[0], self.num_kv_heads, hidden_states.shape[1], 0))
        self._cache_update(cache, empty, empty, kwargs)  # zero bytes, so the cache still has every layer
        return self.output(hidden_states), None

    def output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class LinearAttention(DroppedAttention):
    """Attention replaced by one (C x C) matrix of the normed input, no bias (llama.cpp's has none), fitted by ridge
    (`calibrate.py`; zero until then: a dropped layer); nothing cached, no other token read."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def output(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.linear_attn(hidden_states)


ATTENTION_BY_ROLE = {
    "ordinary": EchoAttAttention,
    "leader": EchoAttAttention,
    "copy": CopyFollowerAttention,
    "lisa": LisaFollowerAttention,
    "dropped": DroppedAttention,
    "linear": LinearAttention,
}


class NarrowMLP(nn.Module):
    """LLaMA's gated FFN at `width` channels (the teacher's most important); at width 0 none, a zero output."""

    def __init__(self, config: EchoAttConfig, width: int):
        super().__init__()
        self.intermediate_size = width
        if width:
            bias = getattr(config, "mlp_bias", False)
            self.gate_proj, self.up_proj = (nn.Linear(config.hidden_size, width, bias=bias) for _ in range(2))
            self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
            self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if not self.intermediate_size:
            return torch.zeros_like(x)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EchoAttDecoderLayer(LlamaDecoderLayer):
    """`LlamaDecoderLayer` with its role's attention and its plan's FFN width; its forward passes the handoff on."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # LlamaDecoderLayer.__init__ would build a full LlamaAttention
        self.hidden_size = config.hidden_size
        self.self_attn = ATTENTION_BY_ROLE[config.role(layer_idx)](config=config, layer_idx=layer_idx)
        width = config.ffn_width(layer_idx)
        self.mlp = LlamaMLP(config) if width == config.intermediate_size else NarrowMLP(config, width)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class EchoAttPreTrainedModel(LlamaPreTrainedModel):
    config_class = EchoAttConfig
    config: EchoAttConfig
    _no_split_modules: ClassVar[list[str]] = ["EchoAttDecoderLayer"]
    _can_record_outputs: ClassVar[dict] = {"hidden_states": EchoAttDecoderLayer, "attentions": AttentionBase}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """LLaMA's init, plus LiSA's parts set so that a new LiSA follower is exactly the head-matched copy."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, HeadAlign):
            onehot = torch.zeros_like(module.mix)
            onehot[torch.arange(len(module.head_map)), module.head_map] = 1.0
            init.copy_(module.mix, onehot)
            init.normal_(module.down, std=module.down.shape[1] ** -0.5)
            init.zeros_(module.up)
        elif isinstance(module, LowRankQK):
            init.zeros_(module.query)
            init.normal_(module.key, std=std)


class EchoAttModel(EchoAttPreTrainedModel, LlamaModel):
    """`LlamaModel` whose forward opens a fresh handoff dict for the leaders and followers of this one call."""

    def __init__(self, config: EchoAttConfig):
        EchoAttPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([EchoAttDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, *args, **kwargs):
        if self.config.context_window is not None:
            self._check_window(args, kwargs)
        kwargs[HANDOFF_KEY] = {}
        return LlamaModel.forward(self, *args, **kwargs)

    def _check_window(self, args: tuple, kwargs: dict) -> None:
        """Refuse a call whose context (cached tokens + new ones) passes the teacher's sliding window."""
        new = kwargs.get("input_ids", args[0] if args else None)
        new = new if new is not None else kwargs.get("inputs_embeds")
        cache = kwargs.get(CACHE_KWARG, kwargs.get("past_key_values"))
        length = (new.shape[1] if new is not None else 0) + (cache.get_seq_length() if cache is not None else 0)
        if length > self.config.context_window:
            raise ValueError(f"a context of {length} tokens is longer than the teacher's sliding window "
                             f"({self.config.context_window}); echoatt students refuse contexts past it")


class EchoAttForCausalLM(EchoAttPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over `EchoAttModel`; generation, losses and the Cache API are LLaMA's."""

    def __init__(self, config: EchoAttConfig):
        EchoAttPreTrainedModel.__init__(self, config)
        self.model = EchoAttModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


EchoAttForCausalLM.register_for_auto_class("AutoModelForCausalLM")
