"""The student's config: a `LlamaConfig` plus where each layer's attention comes from and the teacher's family.

Like transformers' `configuration_*.py` files it imports only transformers, and `save_pretrained` copies it beside a
checkpoint with `modeling_echoatt.py`, so `trust_remote_code=True` loads a student where echoatt is not installed.

The teacher's family (`EchoAttConfig.family`: Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3) is LLaMA plus a few config fields,
read from each family's transformers modeling file, the way transformers keeps Llama's own variants:
- `attention_bias` / `attention_out_bias`: bias on q, k, v and on o (Llama: both as configured; Qwen2: q, k, v only).
- `qk_norm`: per-head RMSNorm on q and k before RoPE (Qwen3's `q_norm`, `k_norm`). Only a layer with Q and K has them:
  a copy follower drops q/k projections and everything only they use (norms, biases).
- `context_window`: the teacher's sliding window, where one applies (Mistral, Qwen with `use_sliding_window`). Within
  the window sliding attention is full causal attention; the student refuses longer contexts with a one-line error
  rather than let a follower see keys its leader's window excluded.
Rotary scaling (`llama3`, `linear`, `dynamic`, `yarn`), `head_dim` and tied embeddings are LLaMA's own config fields.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

DROPPED = -1  # attention_source value of a layer whose attention sub-layer is removed
LINEAR = -2  # attention_source value of a layer whose attention is one fitted (C x C) matrix on its normed input


FOLLOWER_TYPES = ("copy", "lisa")  # the roles that follow a leader, reading its attention
NO_ATTENTION = ("dropped", "linear")  # the roles without attention over tokens: no Q, K or KV cache


REUSE_PATHS = ("auto", "probs", "qk")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # teachers' `model_type`s the student mirrors exactly


FAMILY_FIELDS = ("family", "attention_bias", "attention_out_bias", "qk_norm", "context_window")


def llama_fields(config) -> dict:
    """The fields of any LLaMA-compatible config that a `LlamaConfig` has (the rest, e.g. GGUF's quantisation, drop)."""
    keys = LlamaConfig.__dataclass_fields__.keys() - {"architectures", "model_type"}
    return {k: v for k, v in config.to_dict().items() if k in keys}


def family_fields(config) -> dict:
    """What a teacher's family adds to LLaMA, as `EchoAttConfig` fields (see the module docstring); a student's config
    gives its own. Read from transformers' modeling files: Qwen2Attention has bias on q, k, v and none on o; Qwen3's
    q/k projections carry `q_norm`/`k_norm`; Qwen layers slide only where `layer_types` says so."""
    if isinstance(config, EchoAttConfig):
        return {k: getattr(config, k) for k in FAMILY_FIELDS}
    family = config.model_type
    window = getattr(config, "sliding_window", None)
    if family in ("qwen2", "qwen3") and "sliding_attention" not in (getattr(config, "layer_types", None) or []):
        window = None
    fields = {"family": family, "attention_bias": bool(getattr(config, "attention_bias", False)),
              "attention_out_bias": None, "qk_norm": family == "qwen3", "context_window": window}
    if family == "qwen2":
        fields.update(attention_bias=True, attention_out_bias=False)
    return fields


def head_dim_of(config) -> int:
    """Features per attention head of any family's config (Qwen2's has no `head_dim` field)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def is_read(source: list[int], layer: int) -> bool:
    """Some other layer of an `attention_source` list reads `layer`'s attention."""
    return any(s == layer and i != layer for i, s in enumerate(source))


def source_role(source: list[int], layer: int, follower_type: str = "copy") -> str:
    """`EchoAttConfig.role`'s rule on a bare `attention_source` list (a run's recorded identity keeps the list, not
    the config)."""
    if source[layer] == DROPPED:
        return "dropped"
    if source[layer] == LINEAR:
        return "linear"
    if source[layer] != layer:
        return follower_type
    return "leader" if is_read(source, layer) else "ordinary"


def role_of(config, layer: int) -> str:
    """A layer's role under any config: `EchoAttConfig.role`, and `ordinary` for every layer of a teacher's."""
    return config.role(layer) if isinstance(config, EchoAttConfig) else "ordinary"


def ffn_width_of(config, layer: int) -> int:
    """A layer's FFN width under any config: `EchoAttConfig.ffn_width`, the intermediate size for a teacher's."""
    return config.ffn_width(layer) if isinstance(config, EchoAttConfig) else config.intermediate_size


def is_lisa_parameter(name: str) -> bool:
    """Whether a parameter name belongs to LiSA's added parts (`HeadAlign`, `LowRankQK`), which no teacher has."""
    return ".align." in name or ".lowrank." in name


@strict
class EchoAttConfig(LlamaConfig):
    r"""A `LlamaConfig` plus the teacher's family and where each layer's attention comes from.

    family (`str`): the teacher's `model_type` (one of `FAMILIES`).
    attention_out_bias (`bool`, *optional*): bias on `o_proj`; `None` means as `attention_bias` (q, k, v).
    qk_norm (`bool`): per-head RMSNorm on queries and keys before RoPE (Qwen3).
    context_window (`int`, *optional*): the teacher's sliding window; longer contexts are refused.

    attention_source (`list[int]`, *optional*):
        For each layer, the layer whose attention it uses: itself for ordinary layers and leaders, an earlier layer
        for followers, -1 for a layer whose attention is dropped, -2 for one whose attention is a linear map of its
        normed input (`linear_attn`). `None` means no sharing (the student is the teacher).
    head_map (`list[list[int]]`, *optional*):
        For each layer, the source head that each of its heads reads (copy followers), or starts aligned to (LiSA
        followers). `None` or a missing entry means the identity map (the paper's plain copy).
    follower_type (`str`): `copy` (EchoAtt) or `lisa` (head alignment + low-rank logit correction).
    lisa_rank (`int`, *optional*): per-head rank r of LiSA's Q/K projections; default head_dim // 6 (even).
    lisa_hidden (`int`, *optional*): hidden width of LiSA's head-alignment network; default the head count.
    reuse_path (`str`): `auto`, `probs` or `qk`: how leaders hand attention to copy followers on fused backends.
    reuse_crossover (`int`): `auto` takes the `probs` path for calls with at most this many new tokens.
    intermediate_sizes (`list[int]`, *optional*): per layer, the FFN's width (its kept intermediate channels; 0: no
        FFN). `None` means every layer keeps the teacher's `intermediate_size`.
    """

    model_type = "echoatt_llama"

    attention_source: list[int] | None = None
    head_map: list[list[int] | None] | None = None
    follower_type: str = "copy"
    lisa_rank: int | None = None
    lisa_hidden: int | None = None
    reuse_path: str = "auto"
    reuse_crossover: int = 16
    family: str = "llama"
    attention_out_bias: bool | None = None
    qk_norm: bool = False
    context_window: int | None = None
    intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n, h = self.num_hidden_layers, self.num_attention_heads
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES} (got {self.family!r})")
        if self.attention_source is None:
            self.attention_source = list(range(n))
        if self.head_map is None:
            self.head_map = [None] * n
        if self.lisa_rank is None:
            self.lisa_rank = max(2, self.head_dim // 6 // 2 * 2)
        if self.lisa_hidden is None:
            self.lisa_hidden = h
        if self.follower_type not in FOLLOWER_TYPES or self.reuse_path not in REUSE_PATHS:
            raise ValueError(f"follower_type must be one of {FOLLOWER_TYPES}, reuse_path one of {REUSE_PATHS}")
        if self.lisa_rank % 2 or not 2 <= self.lisa_rank <= self.head_dim:
            raise ValueError(f"lisa_rank must be even and in [2, {self.head_dim}] (RoPE rotates pairs)")
        if len(self.attention_source) != n or len(self.head_map) != n:
            raise ValueError(f"attention_source and head_map need one entry per layer ({n})")
        widths = self.intermediate_sizes
        if widths is not None and (len(widths) != n or not all(0 <= w <= self.intermediate_size for w in widths)):
            raise ValueError(f"intermediate_sizes needs one width per layer ({n}), each in [0, "
                             f"{self.intermediate_size}]")
        for layer, source in enumerate(self.attention_source):
            if source in (DROPPED, LINEAR):
                if layer == 0:
                    raise ValueError("layer 0 keeps its attention: the KV cache counts tokens there")
            elif source != layer and self.follower_type == "lisa":
                if source != layer - 1 or self.attention_source[source] in (DROPPED, LINEAR):
                    raise ValueError(f"LiSA layer {layer} must follow the layer before it, which keeps attention")
            elif source != layer and not (0 <= source < layer and self.attention_source[source] == source):
                raise ValueError(f"layer {layer} follows layer {source}, which is not an earlier leader")
            heads = self.head_map[layer]
            if heads is not None and (len(heads) != h or not all(0 <= g < h for g in heads)):
                raise ValueError(f"head_map[{layer}] must list {h} head indices in [0, {h})")

    @classmethod
    def from_teacher(cls, config, **sharing) -> EchoAttConfig:
        """A teacher's config (any of `FAMILIES`, GGUF-loaded or not, or a student's) with the sharing fields given."""
        converted = cls(**{**llama_fields(config), **family_fields(config)}, **sharing)
        converted._attn_implementation = config._attn_implementation
        return converted

    def role(self, layer: int) -> str:
        """What `layer`'s attention is: `ordinary`, `leader` (others read it), `copy` or `lisa` (a follower),
        `dropped`, or `linear` (a fitted map). The model's attention class, the cost model, KV accounting and what
        trains all ask this."""
        return source_role(self.attention_source, layer, self.follower_type)

    def is_leader(self, layer: int) -> bool:
        """Some other layer reads this layer's attention."""
        return is_read(self.attention_source, layer)

    def follows(self, layer: int) -> bool:
        """`layer` reads a leader's attention (a copy or LiSA follower)."""
        return self.role(layer) in FOLLOWER_TYPES

    def attends(self, layer: int) -> bool:
        """`layer` has attention over tokens, its own or a leader's (not dropped, not a linear map): it keeps a KV
        cache."""
        return self.role(layer) not in NO_ATTENTION

    def followers(self) -> list[int]:
        """The layers that follow a leader (copy, LiSA)."""
        return [i for i in range(self.num_hidden_layers) if self.follows(i)]

    def attention_changed(self) -> list[int]:
        """Layers whose attention differs from the teacher's: followers, dropped and linear layers."""
        return [i for i in range(self.num_hidden_layers) if self.follows(i) or not self.attends(i)]

    def ffn_width(self, layer: int) -> int:
        """`layer`'s FFN width: its kept intermediate channels (0: no FFN)."""
        return self.intermediate_size if self.intermediate_sizes is None else self.intermediate_sizes[layer]

    def changed(self) -> list[int]:
        """Layers that differ from the teacher's in any way: attention (`attention_changed`) or a narrowed or dropped
        FFN."""
        narrowed = {i for i in range(self.num_hidden_layers) if self.ffn_width(i) != self.intermediate_size}
        return sorted(set(self.attention_changed()) | narrowed)

    def reuse_probs(self, new_tokens: int, eager: bool) -> bool:
        """Whether a leader hands over probabilities (reuse path) rather than Q and K (fused path) for a call with
        `new_tokens` new tokens."""
        path = self.reuse_path
        return eager or path == "probs" or (path == "auto" and new_tokens <= self.reuse_crossover)

    def crosses_groups(self, layer: int) -> bool:
        """Some head of `layer` reads a leader head outside its own KV group (GQA): its keys and values no longer share
        one layout, so an engine with one K/V cache per layer (vLLM) caches them per query head there."""
        heads = self.head_map[layer]
        groups = self.num_attention_heads // self.num_key_value_heads
        return heads is not None and any(g // groups != h // groups for h, g in enumerate(heads))

    def cached_key_dims(self, layer: int) -> int:
        """Key features per KV head that `layer` keeps in the cache."""
        return {"dropped": 0, "linear": 0, "copy": 0, "lisa": self.lisa_rank}.get(self.role(layer), self.head_dim)

    def cached_value_dims(self, layer: int) -> int:
        """Value features per KV head that `layer` keeps in the cache."""
        return self.head_dim if self.attends(layer) else 0


EchoAttConfig.register_for_auto_class()
