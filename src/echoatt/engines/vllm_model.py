"""echoatt students in vLLM: the model class the plugin (`echoatt.engines.vllm_serve.register`) registers for `EchoAttForCausalLM`.

Imports vLLM, so only the serve environment (`scripts/setup.sh --serve`, or `pip install "echoatt[serve]"`) imports
it; vLLM loads it lazily by name. It mirrors `echoatt.model.modeling_echoatt` with vLLM's own layers — paged
`Attention`, fused QKV and gate/up projections, fused residual RMSNorm, rotary embeddings from `get_rope` — so the
student is served, batched, sampled and cached as any model vLLM knows. Per role (`EchoAttConfig.role`):
- ordinary / leader: LLaMA's attention (Qwen2's q/k/v bias, Qwen3's q/k norms where the family has them). A leader
  puts its post-RoPE Q and K into the forward's handoff dict.
- copy follower: no Q/K projection; head h takes the leader's query head `head_map[h]` and the leader's keys, its
  own V, into its own `Attention` layer, then its own `o_proj`. The same softmax(QK^T)V as the leader's row for that
  head, so exact. Its cost in vLLM's KV cache: vLLM keeps one K/V cache per `Attention` layer and has no way to read
  keys from one layer's cache and values from another's, so **a follower stores the leader's keys again** (as many
  bytes as an ordinary layer); where its head map crosses KV groups, it stores them per query head (keys gathered,
  values repeated: H / Hkv times an ordinary layer). In vLLM a follower saves its Q/K projections, not cache.
- dropped: no attention, no input norm, nothing cached; only the MLP.
- linear: one (C x C) matrix on the normed input (`self_attn.linear_attn`), replicated on every device; nothing cached.
Each layer's MLP has its own width (`EchoAttConfig.ffn_width`); a layer without one has no MLP and no post-attention
norm, and hands its attention output on unsummed, as vLLM's fused residual norms expect (the next norm adds it).
LiSA followers (the leader's logits, not its probabilities or Q/K) cannot be expressed with vLLM's attention kernels
and are refused by name at load, as is tensor or pipeline parallelism across a follower's head map.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from echoatt.engines.vllm_serve import check_servable, local_head_map
from echoatt.model.configuration_echoatt import EchoAttConfig

STACKED = (  # checkpoint name part -> (vLLM parameter name part, shard)
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)


class EchoAttAttention(nn.Module):
    """An ordinary layer's attention (LLaMA's, with the family's biases and q/k norms), or a leader's: the same, and
    it hands its post-RoPE Q and K on."""

    def __init__(self, config: EchoAttConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.layer = extract_layer_index(prefix)
        self.is_leader = config.is_leader(self.layer)
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias,
                                          quant_config=quant, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=out_bias,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters, is_neox_style=True)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, handoff: dict) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)  # (T, (H + 2 Hkv) D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        if self.is_leader:
            handoff[self.layer] = (q, k)  # (T, H D), (T, Hkv D), post-RoPE
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class CopyFollowerAttention(nn.Module):
    """EchoAtt's follower: the leader's post-RoPE queries by head map and its keys, its own V and O."""

    def __init__(self, config: EchoAttConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.layer = extract_layer_index(prefix)
        self.source = config.attention_source[self.layer]
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        groups = self.num_heads // self.num_kv_heads
        head_map = local_head_map(config.head_map[self.layer], config.num_attention_heads, tp) or list(
            range(self.num_heads))  # this device's heads: an identity map stored as a list is this device's identity
        key_map, value_map = [g // groups for g in head_map], [h // groups for h in range(self.num_heads)]
        # Head h reads source head head_map[h], so keys of KV head key_map[h] and its own values of value_map[h]. Where
        # the two agree for every head, GQA holds as it is; otherwise keys and values are laid out per query head.
        self.aligned = not config.crosses_groups(self.layer)
        self.register_buffer("head_index", torch.tensor(head_map), persistent=False)
        self.register_buffer("key_index", torch.tensor(key_map), persistent=False)
        self.register_buffer("value_index", torch.tensor(value_map), persistent=False)
        self.identity = head_map == list(range(self.num_heads))
        out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
        quant = vllm_config.quant_config
        self.v_proj = ColumnParallelLinear(config.hidden_size, config.num_key_value_heads * self.head_dim,
                                           bias=config.attention_bias, quant_config=quant, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=out_bias,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5,
                              num_kv_heads=self.num_kv_heads if self.aligned else self.num_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, handoff: dict) -> torch.Tensor:
        q, k = handoff[self.source]  # (T, H D), (T, Hkv D)
        v, _ = self.v_proj(hidden_states)  # (T, Hkv D)
        tokens, d = q.shape[0], self.head_dim
        if not self.identity:
            q = q.view(tokens, -1, d).index_select(1, self.head_index).reshape(tokens, -1)
        if not self.aligned:  # (T, H D) each
            k = k.view(tokens, -1, d).index_select(1, self.key_index).reshape(tokens, -1)
            v = v.view(tokens, -1, d).index_select(1, self.value_index).reshape(tokens, -1)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class LinearAttention(nn.Module):
    """Attention replaced by one (C x C) matrix of the normed input, as `modeling_echoatt.LinearAttention`."""

    def __init__(self, config: EchoAttConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.linear_attn = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=False,
                                            quant_config=vllm_config.quant_config, prefix=f"{prefix}.linear_attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, handoff: dict) -> torch.Tensor:
        return self.linear_attn(hidden_states)[0]


ATTENTION_BY_ROLE = {"ordinary": EchoAttAttention, "leader": EchoAttAttention, "copy": CopyFollowerAttention,
                     "linear": LinearAttention}


class EchoAttDecoderLayer(nn.Module):
    """LLaMA's decoder layer with the attention of its role and the MLP width of its plan; a dropped layer has no
    attention and no input norm, an FFN-free one no MLP and no post-attention norm."""

    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config: EchoAttConfig = vllm_config.model_config.hf_config
        layer = extract_layer_index(prefix)
        role = config.role(layer)
        self.self_attn = self.mlp = None
        if role != "dropped":
            self.self_attn = ATTENTION_BY_ROLE[role](config, vllm_config, prefix=f"{prefix}.self_attn")
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.ffn_width(layer):
            self.mlp = LlamaMLP(config.hidden_size, config.ffn_width(layer), config.hidden_act,
                                quant_config=vllm_config.quant_config, bias=getattr(config, "mlp_bias", False),
                                prefix=f"{prefix}.mlp")
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                handoff: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attn is not None:
            if residual is None:
                residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(positions, hidden_states, handoff)
        if self.mlp is None:  # the sum with the residual is left to the next norm
            return hidden_states, residual
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)  # adds, then normalises
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0})
class EchoAttModel(nn.Module):
    """Embedding, decoder layers and final norm; one handoff dict per forward carries leaders' Q/K to followers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       quant_config=vllm_config.quant_config)
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: EchoAttDecoderLayer(vllm_config, prefix), prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None,
                ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        handoff: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual, handoff)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class EchoAttForCausalLM(nn.Module):
    """What vLLM instantiates for a checkpoint whose config names `EchoAttForCausalLM`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        check_servable(config, vllm_config.model_config.max_model_len, parallel.tensor_parallel_size,
                       parallel.pipeline_parallel_size)
        self.config = config
        self.model = EchoAttModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The student's checkpoint names (LLaMA's) into vLLM's fused parameters. A follower's `v_proj` stays its own
        parameter; weights this rank does not hold (another pipeline stage, a dropped layer's unused input norm, a
        tied `lm_head`) are skipped."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            target, shard = name, None
            for part, fused, shard_id in STACKED:
                if part in name and name.replace(part, fused) in params:
                    target, shard = name.replace(part, fused), shard_id
                    break
            if target not in params:
                continue
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, weight) if shard is None else loader(param, weight, shard)
            loaded.add(target)
        return loaded
