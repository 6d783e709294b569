"""The analytic bound: what followers no longer compute or move, as FLOPs and as bytes.

Counted for one forward call over a batch of B sequences, T new tokens each, with P tokens already cached (prefill:
P = 0; one decode step: T = 1). A matmul of (m x k) by (k x n) costs 2mkn FLOPs. Bytes are what must cross memory:
every weight once per call, KV-cache writes and reads, and, on the eager path, the materialised scores and
probabilities (B, H, T, P+T) in float32, written and read once per pass. Activations between matmuls are left out
(they are the same for teacher and student and small against weights in decode).

Attention scores cost a full T x (P+T) matrix on the eager path; fused kernels (SDPA, flash) skip the masked upper
triangle, so they are counted with the mean causal key length P + (T+1)/2.

What a follower (copy method) saves:
- fused path: its Q and K projections, RoPE on Q and K, and its K-cache write. The kernel still computes the leader's
  QK^T and softmax again for the follower's V, and still reads the leader's K.
- eager (reuse) path: Q and K projections, RoPE, K-cache write and read, QK^T, mask and softmax; it reads the
  leader's probabilities where the teacher read its own (the same bytes).
A dropped layer (the baseline) saves its whole attention sub-layer.

bound = teacher cost / student cost. Prefill and training are compute-bound, so their bound uses FLOPs; decode is
memory-bound, so its bound uses bytes. Both are printed.
"""

from __future__ import annotations

from dataclasses import dataclass

SOFTMAX_FLOPS = 5  # per score: scale, mask add, max, exp, normalise
ROPE_FLOPS = 3  # per element: x*cos + rotate(x)*sin


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
    C, H, Hkv, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    w = dtype_bytes
    keys = P + T if eager else P + (T + 1) / 2  # keys each query scores against
    full = B * H * T * (P + T)  # scores materialised on the eager path
    return {
        "q_proj": Cost(2 * B * T * C * H * D, C * H * D * w),
        "k_proj": Cost(2 * B * T * C * Hkv * D, C * Hkv * D * w),
        "v_proj": Cost(2 * B * T * C * Hkv * D, C * Hkv * D * w),
        "rope_qk": Cost(ROPE_FLOPS * B * T * (H + Hkv) * D),
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
    "fused": ("q_proj", "k_proj", "rope_qk", "k_write"),
    "eager": ("q_proj", "k_proj", "rope_qk", "k_write", "k_read", "scores", "softmax"),
}


def forward_cost(config, B: int, T: int, P: int, eager: bool, dtype_bytes: int, logits: int | None = None) -> Cost:
    """One forward call of a LLaMA or an echoatt student. `logits`: positions the LM head scores (default T)."""
    C, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    source = getattr(config, "attention_source", None) or list(range(config.num_hidden_layers))
    parts = attention_parts(config, B, T, P, eager, dtype_bytes)
    whole = sum(parts.values(), Cost())
    saved_by_follower = sum((parts[k] for k in SAVED["eager" if eager else "fused"]), Cost())
    mlp = Cost(3 * 2 * B * T * C * I, 3 * C * I * dtype_bytes)
    total = Cost()
    for layer, src in enumerate(source):
        if src == -1:
            attn = Cost()
        elif src != layer:
            attn = whole + saved_by_follower * -1
        else:
            attn = whole
        total = total + attn + mlp
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
          dtype_bytes: int, logits: int | None = None, train: bool = False, with_teacher: bool = False) -> Bound:
    """Best possible teacher-time / student-time for one setting.

    `train`: forward + backward (~3x forward FLOPs, bytes alike). `with_teacher`: the distillation step, where a
    teacher forward is paid on both sides."""
    t = forward_cost(teacher_config, B, T, P, teacher_eager, dtype_bytes, logits)
    s = forward_cost(student_config, B, T, P, student_eager, dtype_bytes, logits)
    if train:
        t_total, s_total = t * 3, s * 3
        if with_teacher:
            t_total, s_total = t_total + t, s_total + t
        t, s = t_total, s_total
    regime = "bytes" if T == 1 else "flops"
    return Bound(t.flops / s.flops, t.bytes / s.bytes, regime)
