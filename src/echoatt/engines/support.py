"""What each engine without echoatt can run, one check per export target: the exporter refuses by it (`gguf_export`,
`decilm_export`) and `vllm_serve.serving_text` offers a target only where it passes, so the two never disagree.
Each check takes a student's config and returns None (it runs there) or the refusal, naming what stands in the way.
Torch-free: the report imports it."""

from __future__ import annotations

from echoatt.planning.plan import SERVABLE_PLAN

KEPT_OR_DROPPED = (f"export a student whose attention is only kept or dropped — e.g. `echoatt run --plan "
                   f"{SERVABLE_PLAN}` (the planner's budget met by dropped attention alone) or `--method drop`")


def gguf_refusal(config) -> str | None:
    """llama.cpp's `deci` layers: attention kept or dropped, no q/k norms, no attention biases, default RoPE."""
    if config.followers():
        return (f"layers {config.followers()} reuse another layer's attention, which no llama.cpp architecture can: "
                + KEPT_OR_DROPPED)
    if config.qk_norm:
        return f"{config.family} normalises q and k per head, which llama.cpp's deci layers do not"
    out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
    if config.attention_bias or out_bias:
        return f"{config.family} attention has biases, which echoatt's GGUF export does not write yet"
    rope = (config.rope_parameters or {}).get("rope_type", "default")
    if rope != "default":
        return f"RoPE scaling {rope!r} is not exported to GGUF yet (default RoPE only)"
    return None


def decilm_refusal(config) -> str | None:
    """A DeciLM / Nemotron-NAS layer (vLLM, SGLang, TensorRT-LLM): attention kept or dropped (no linear map), no q/k
    norms."""
    if config.followers():
        return (f"layers {config.followers()} reuse another layer's attention, which a DeciLM layer cannot: "
                + KEPT_OR_DROPPED + ", or serve this one in vLLM with echoatt installed")
    linear = [i for i in range(config.num_hidden_layers) if config.role(i) == "linear"]
    if linear:
        return (f"layers {linear} replace attention by a linear map, which vLLM's DeciLM model does not read (it would "
                "build full attention there): export GGUF for llama.cpp (--format gguf), or serve this student in "
                "vLLM with echoatt installed")
    if config.qk_norm:
        return (f"{config.family} attention normalises q and k per head, which DeciLM layers do not: serve this "
                "student in vLLM with echoatt installed")
    return None


def vllm_refusal(config) -> str | None:
    """echoatt's vLLM plugin: every role but LiSA's followers."""
    if config.follower_type == "lisa" and config.followers():
        return "LiSA followers, which vLLM's attention kernels cannot express"
    return None
