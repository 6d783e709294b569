"""The shared-attention student: a LLaMA whose *follower* layers reuse a *leader* layer's attention.

One file on purpose (like transformers' `modeling_llama.py`): it imports only torch and transformers, so
`save_pretrained` can copy it beside a checkpoint and `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where echoatt is not installed. With echoatt imported, no remote code is needed.

A follower has no `q_proj`/`k_proj`: head h of a follower applies the attention of leader head `head_map[h]` to its
own values, then its own `o_proj`. The leader hands its attention over through a per-forward dict (`attention_handoff`)
that travels with the layers' keyword arguments, so nothing is kept on the modules between calls.

Two reuse paths, same math, chosen by the attention implementation:
- eager: the leader materialises its probabilities P (B, H, Tq, Tk); a follower computes P[:, head_map] @ V.
- anything else (sdpa, flash, flex): the leader hands over its post-RoPE Q (B, H, Tq, D) and K (B, Hkv, Tk, D); a
  follower calls the same attention kernel on (Q[:, head_map], K[:, head_map // groups], V), so no Tq x Tk matrix
  is stored.
Followers keep only V in the KV cache: their key slot is a (B, Hkv, T, 0) tensor, zero bytes that still count tokens.

The baseline a user would pick instead, *attention drop*, is the same class with `attention_source[i] = -1`: layer i
has no attention sub-layer at all (no Q/K/V/O weights, nothing cached), only its MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig
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

HANDOFF_KEY = "attention_handoff"
DROPPED = -1  # attention_source value of a layer whose attention sub-layer is removed


@strict
class EchoAttConfig(LlamaConfig):
    r"""A `LlamaConfig` plus where each layer's attention comes from.

    attention_source (`list[int]`, *optional*):
        For each layer, the layer whose attention it uses: itself for ordinary layers and leaders, an earlier leader
        for followers, -1 for a layer whose attention is dropped. `None` means no sharing (the student is the
        teacher).
    head_map (`list[list[int]]`, *optional*):
        For each layer, the leader head that each of its heads reads (used for followers only). `None` or a missing
        entry means the identity map (the paper's plain copy).
    """

    model_type = "echoatt_llama"

    attention_source: list[int] | None = None
    head_map: list[list[int] | None] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, h = self.num_hidden_layers, self.num_attention_heads
        if self.attention_source is None:
            self.attention_source = list(range(n))
        if self.head_map is None:
            self.head_map = [None] * n
        if len(self.attention_source) != n or len(self.head_map) != n:
            raise ValueError(f"attention_source and head_map need one entry per layer ({n})")
        for layer, source in enumerate(self.attention_source):
            if source == DROPPED:
                if layer == 0:
                    raise ValueError("layer 0 keeps its attention: the KV cache counts tokens there")
            elif source != layer and not (0 <= source < layer and self.attention_source[source] == source):
                raise ValueError(f"layer {layer} follows layer {source}, which is not an earlier leader")
            heads = self.head_map[layer]
            if heads is not None and (len(heads) != h or not all(0 <= g < h for g in heads)):
                raise ValueError(f"head_map[{layer}] must list {h} head indices in [0, {h})")

    def is_follower(self, layer: int) -> bool:
        return self.attention_source[layer] not in (layer, DROPPED)

    def is_dropped(self, layer: int) -> bool:
        return self.attention_source[layer] == DROPPED

    def is_leader(self, layer: int) -> bool:
        return any(s == layer and i != layer for i, s in enumerate(self.attention_source))

    def followers(self) -> list[int]:
        """Layers whose attention differs from the teacher's: followers, and dropped layers."""
        return [i for i in range(self.num_hidden_layers) if self.attention_source[i] != i]


class EchoAttAttention(nn.Module):
    """LLaMA attention in one of three roles: ordinary, leader (hands its attention on), follower (reuses it)."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.source = config.attention_source[layer_idx]
        self.is_follower = config.is_follower(layer_idx)
        self.is_leader = config.is_leader(layer_idx)
        self.is_dropped = config.is_dropped(layer_idx)
        bias = config.attention_bias
        if self.is_dropped:
            return
        if self.is_follower:
            # The follower's own tensors are already expanded to H heads, so the kernels must not repeat them again.
            self.num_key_value_groups = 1
            groups = self.num_heads // self.num_kv_heads
            heads = config.head_map[layer_idx] or list(range(self.num_heads))
            self.head_map = list(heads)
            self.identity_map = self.head_map == list(range(self.num_heads))
            self.key_map = [g // groups for g in self.head_map]  # leader KV head behind each leader head read
            self.value_map = [h // groups for h in range(self.num_heads)]  # own KV head of each own head
            self._index_cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        else:
            self.num_key_value_groups = self.num_heads // self.num_kv_heads
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
            self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _interface(self) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._index_cache:
            self._index_cache[device] = tuple(
                torch.tensor(m, device=device) for m in (self.head_map, self.key_map, self.value_map)
            )
        return self._index_cache[device]

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, C)
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        handoff: dict = kwargs.pop(HANDOFF_KEY, None)
        if self.is_dropped:
            if past_key_values is not None:  # zero bytes, so the cache still has every layer
                empty = hidden_states.new_empty((hidden_states.shape[0], self.num_kv_heads, hidden_states.shape[1], 0))
                past_key_values.update(empty, empty, self.layer_idx)
            return torch.zeros_like(hidden_states), None
        if handoff is None and (self.is_leader or self.is_follower):
            raise RuntimeError("shared attention needs the model's forward (it passes the leader's attention on)")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)
        dropout = self.attention_dropout if self.training else 0.0

        if self.is_follower:
            if past_key_values is not None:
                no_keys = value.new_empty((*value.shape[:-1], 0))  # (B, Hkv, T, 0): counts tokens, stores nothing
                _, value = past_key_values.update(no_keys, value, self.layer_idx)
            head_index, key_index, value_index = self._indices(value.device)
            value = value if self.num_kv_heads == self.num_heads else value.index_select(1, value_index)  # (B,H,Tk,D)
            lead = handoff[self.source]
            if isinstance(lead, torch.Tensor):  # eager: leader's probabilities (B, H, Tq, Tk)
                probs = lead if self.identity_map else lead.index_select(1, head_index)
                attn_output = torch.matmul(probs, value).transpose(1, 2)  # (B, Tq, H, D)
                attn_weights = probs
            else:  # fused: leader's post-RoPE query (B, H, Tq, D) and key (B, Hkv, Tk, D)
                query, key = lead
                query = query if self.identity_map else query.index_select(1, head_index)
                key = key.index_select(1, key_index)  # (B, H, Tk, D)
                attn_output, attn_weights = self._interface()(
                    self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
                )
        else:
            query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
            key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            attn_output, attn_weights = self._interface()(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
            if self.is_leader:
                eager = self.config._attn_implementation == "eager"
                handoff[self.layer_idx] = attn_weights if eager else (query, key)

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class EchoAttDecoderLayer(LlamaDecoderLayer):
    """`LlamaDecoderLayer` with an `EchoAttAttention`; its inherited forward passes the handoff on in kwargs."""

    def __init__(self, config: EchoAttConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # LlamaDecoderLayer.__init__ would build a full LlamaAttention
        self.hidden_size = config.hidden_size
        self.self_attn = EchoAttAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class EchoAttPreTrainedModel(LlamaPreTrainedModel):
    config_class = EchoAttConfig
    config: EchoAttConfig
    _no_split_modules = ["EchoAttDecoderLayer"]
    _can_record_outputs = {"hidden_states": EchoAttDecoderLayer, "attentions": EchoAttAttention}


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
        kwargs[HANDOFF_KEY] = {}
        return LlamaModel.forward(self, *args, **kwargs)


class EchoAttForCausalLM(EchoAttPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over `EchoAttModel`; generation, losses and the Cache API are LLaMA's."""

    def __init__(self, config: EchoAttConfig):
        EchoAttPreTrainedModel.__init__(self, config)
        self.model = EchoAttModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


EchoAttConfig.register_for_auto_class()
EchoAttForCausalLM.register_for_auto_class("AutoModelForCausalLM")
