"""The analytic bound: what followers no longer compute or move, as FLOPs and as bytes.

Counted for one forward call over a batch of B sequences, T new tokens each, with P tokens already cached (prefill:
P = 0; one decode step: T = 1). A matmul of (m x k) by (k x n) costs 2mkn FLOPs. Bytes are what must cross memory:
every weight once per call, KV-cache writes and reads, and, where attention is materialised, the scores and
probabilities (B, H, T, P+T) in float32, written and read once per pass. Activations between matmuls are left out
(they are the same for teacher and student and small against weights in decode).

Attention scores cost a full T x (P+T) matrix where materialised; fused kernels (SDPA, flash) skip the masked upper
triangle, so they are counted with the mean causal key length P + (T+1)/2.

Each student layer is costed by its role, on the path the model takes (`EchoAttConfig.reuse_probs`):
- ordinary layer: as the teacher's.
- leader on the reuse path (eager, or a fused backend with at most `reuse_crossover` new tokens): materialised
  attention (scores and probabilities written and read).
- copy follower, reuse path: skips its Q and K projections, RoPE (and Qwen3's q/k norms) on Q and K, K-cache write
  and read, QK^T, mask and softmax; it reads the leader's probabilities where the teacher read its own scores. A
  non-identity head map first gathers them (read and written once per distinct map of a block, `gather_cost`); the
  leader scales Q, not the T-long scores, so no pass over the scores is left uncounted.
- copy follower, fused path: skips its Q and K projections, RoPE and K-cache write; the kernel still computes the
  leader's QK^T and softmax again for the follower's V, and still reads the leader's K.
- LiSA follower: rank-r Q/K projections, RoPE and cache for r dims, a rank-r QK^T, the head alignment (H x H mix and
  H -> hidden -> H MLP at every score), softmax, materialised logits and probabilities; its own V and O.
- dropped layer (the baseline): nothing.
- linear attention: one (C x C) matmul on the normed input, its weights read; no KV cache, no scores.

Each layer's FFN costs its own width (`EchoAttConfig.ffn_width`: narrowed or dropped FFNs cost less or nothing).

In vLLM (`engine="vllm"`) a copy follower takes the leader's post-RoPE Q and K into its own attention layer: it saves
the Q and K projections and RoPE, nothing else — vLLM keeps one K/V cache per attention layer, so the follower writes
and reads the leader's keys again, and per query head (H / Hkv times the bytes) where its head map crosses KV groups.

bound = teacher cost / student cost. Prefill and training are compute-bound, so their bound uses FLOPs; decode is
memory-bound, so its bound uses bytes. Both are printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from echoatt.model.configuration_echoatt import NO_ATTENTION, family_fields, ffn_width_of, head_dim_of, role_of

SOFTMAX_FLOPS = 5  # per score: scale, mask add, max, exp, normalise
ROPE_FLOPS = 3  # per element: x*cos + rotate(x)*sin
NORM_FLOPS = 4  # per element of Qwen3's q/k RMSNorm before RoPE: square, sum, scale, weight


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)


def attention_parts(config, B: int, T: int, P: int, eager: bool, dtype_bytes: int) -> dict[str, Cost]:
    """The cost of each piece of one ordinary attention sub-layer."""
    C, H, Hkv, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim_of(config)
    w = dtype_bytes
    keys = P + T if eager else P + (T + 1) / 2  # keys each query scores against
    full = B * H * T * (P + T)  # scores materialised on the eager path
    return {
        "q_proj": Cost(2 * B * T * C * H * D, C * H * D * w),
        "k_proj": Cost(2 * B * T * C * Hkv * D, C * Hkv * D * w),
        "v_proj": Cost(2 * B * T * C * Hkv * D, C * Hkv * D * w),
        "rope_qk": Cost((ROPE_FLOPS + NORM_FLOPS * family_fields(config)["qk_norm"]) * B * T * (H + Hkv) * D),
        "k_write": Cost(0, B * T * Hkv * D * w),
        "v_write": Cost(0, B * T * Hkv * D * w),
        "k_read": Cost(0, B * (P + T) * Hkv * D * w),
        "v_read": Cost(0, B * (P + T) * Hkv * D * w),
        "scores": Cost(2 * B * H * T * keys * D, 2 * full * 4 if eager else 0),  # write, then read by softmax
        "softmax": Cost(SOFTMAX_FLOPS * B * H * T * keys, full * 4 if eager else 0),  # probabilities written
        "pv": Cost(2 * B * H * T * keys * D, full * 4 if eager else 0),  # probabilities read
        "o_proj": Cost(2 * B * T * H * D * C, H * D * C * w),
    }


SAVED = {
    "vllm": ("q_proj", "k_proj", "rope_qk"),
    "fused": ("q_proj", "k_proj", "rope_qk", "k_write"),
    "eager": ("q_proj", "k_proj", "rope_qk", "k_write", "k_read", "scores", "softmax"),
}


def lisa_parts(config, B: int, T: int, P: int, dtype_bytes: int) -> dict[str, Cost]:
    """The cost of what a LiSA follower computes instead of Q, K, QK^T (its V, softmax, PV and O are as eager)."""
    C, H, Hkv, r = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.lisa_rank
    hidden, w = config.lisa_hidden, dtype_bytes
    full = B * H * T * (P + T)
    return {
        "lowrank_qk": Cost(2 * B * T * C * (H + Hkv) * r, C * (H + Hkv) * r * w),
        "rope_lowrank": Cost(ROPE_FLOPS * B * T * (H + Hkv) * r),
        "lowrank_cache": Cost(0, B * (T + (P + T)) * Hkv * r * w),  # write the new keys, read all
        "lowrank_scores": Cost(2 * full * r, 2 * full * 4),
        "align": Cost(2 * full * (H + 2 * hidden) + 4 * B * hidden * T * (P + T), 2 * full * 4),  # source logits read,
    }  # own logits written (read again by the softmax, counted in "softmax")


def attention_cost(config, layer: int, B: int, T: int, P: int, eager: bool, dtype_bytes: int,
                   engine: str = "torch") -> Cost:
    """One layer's attention sub-layer, by its role in `config` on the path the model takes there (`engine`: torch,
    echoatt's own model, or vllm)."""
    role = role_of(config, layer)
    if role == "dropped":
        return Cost()
    if role == "linear":
        C = config.hidden_size
        return Cost(2 * B * T * C * C, C * C * dtype_bytes)
    lisa = getattr(config, "follower_type", "copy") == "lisa"
    materialised = engine == "torch" and (eager or (role != "ordinary" and (lisa or config.reuse_probs(T, eager))))
    parts = attention_parts(config, B, T, P, materialised, dtype_bytes)
    whole = sum(parts.values(), Cost())
    if role in ("ordinary", "leader"):
        return whole
    if engine == "vllm":  # a copy follower (vLLM refuses LiSA)
        per_head = vllm_cached_heads(config, layer) / config.num_key_value_heads
        cache = sum((parts[k] for k in ("k_write", "v_write", "k_read", "v_read")), Cost()) * (per_head - 1)
        return whole + cache + sum((parts[k] for k in SAVED["vllm"]), Cost()) * -1
    if role == "lisa":
        kept = ("v_proj", "v_write", "v_read", "softmax", "pv", "o_proj")
        return sum((parts[k] for k in kept), Cost()) + sum(lisa_parts(config, B, T, P, dtype_bytes).values(), Cost())
    follower = whole + sum((parts[k] for k in SAVED["eager" if materialised else "fused"]), Cost()) * -1
    return follower + (gather_cost(config, layer, B, T, P) if materialised else Cost())


def vllm_cached_heads(config, layer: int) -> int:
    """KV heads vLLM caches for `layer`: none where attention is dropped, every query head's for a copy follower whose
    head map crosses KV groups (keys gathered, values repeated), else the KV heads (followers too: one cache a layer)."""
    role = role_of(config, layer)
    if role in NO_ATTENTION:
        return 0
    crossing = role == "copy" and config.crosses_groups(layer)
    return config.num_attention_heads if crossing else config.num_key_value_heads


def gather_cost(config, layer: int, B: int, T: int, P: int) -> Cost:
    """A copy follower on the reuse path reads P[:, head_map]: a non-identity map gathers the leader's probabilities
    into a copy (read and written once), shared with the block's earlier followers of the same map (in inference)."""
    head_map = (getattr(config, "head_map", None) or [None] * config.num_hidden_layers)[layer]
    H = config.num_attention_heads
    if head_map is None or list(head_map) == list(range(H)):
        return Cost()
    source = config.attention_source
    earlier = [j for j in range(layer) if source[j] == source[layer] and j != source[layer]]
    if any(list(config.head_map[j] or range(H)) == list(head_map) for j in earlier):
        return Cost()
    return Cost(0, 2 * B * H * T * (P + T) * 4)


def forward_cost(config, B: int, T: int, P: int, eager: bool, dtype_bytes: int, logits: int | None = None,
                 engine: str = "torch") -> Cost:
    """One forward call of a LLaMA or an echoatt student. `logits`: positions the LM head scores (default T)."""
    C, V = config.hidden_size, config.vocab_size
    total = Cost()
    for layer in range(config.num_hidden_layers):
        width = ffn_width_of(config, layer)
        mlp = Cost(3 * 2 * B * T * C * width, 3 * C * width * dtype_bytes)
        total = total + attention_cost(config, layer, B, T, P, eager, dtype_bytes, engine) + mlp
    n = T if logits is None else logits
    head = Cost(2 * B * n * C * V, C * V * dtype_bytes + B * n * V * 4)
    return total + head + Cost(0, B * T * C * dtype_bytes)  # embedding rows read


@dataclass(frozen=True)
class Bound:
    flops: float  # teacher FLOPs / student FLOPs
    bytes: float  # teacher bytes / student bytes
    regime: str  # "flops" (prefill, training) or "bytes" (decode)

    @property
    def value(self) -> float:
        return self.flops if self.regime == "flops" else self.bytes


def bound(teacher_config, student_config, B: int, T: int, P: int, teacher_eager: bool, student_eager: bool,
          dtype_bytes: int, logits: int | None = None, train: bool = False, with_teacher: bool = False,
          engine: str = "torch") -> Bound:
    """Best possible teacher-time / student-time for one setting, in `engine` (torch or vllm).

    `train`: forward + backward (~3x forward FLOPs, bytes alike). `with_teacher`: the distillation step, where a
    teacher forward is paid on both sides."""
    t = forward_cost(teacher_config, B, T, P, teacher_eager, dtype_bytes, logits, engine)
    s = forward_cost(student_config, B, T, P, student_eager, dtype_bytes, logits, engine)
    if train:
        t_total, s_total = t * 3, s * 3
        if with_teacher:
            t_total, s_total = t_total + t, s_total + t
        t, s = t_total, s_total
    regime = "bytes" if T == 1 else "flops"
    return Bound(t.flops / s.flops, t.bytes / s.bytes, regime)
