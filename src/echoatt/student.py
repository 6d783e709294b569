"""Copy: build the shared-attention student from a teacher and a sharing plan, and count what it saves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from echoatt.analysis import Similarity
from echoatt.modeling import DROPPED, EchoAttConfig, EchoAttForCausalLM, is_lisa_parameter
from echoatt.plan import PlanError, SharingPlan
from echoatt.teacher import convert_config

HEAD_MAPS = ("matched", "grouped", "identity")
METHODS = ("copy", "lisa", "drop")


def head_maps(
    plan: SharingPlan, similarity: Similarity | None, mode: str = "matched", chain: bool = False, kv_groups: int = 1
) -> list[list[int] | None]:
    """Per layer, the source head each follower head reads: most similar (`matched`), most similar within its own KV
    group of `kv_groups` heads (`grouped`), or the same index (`identity`). The source is the block's leader, or
    with `chain` (LiSA) the layer just before the follower."""
    if mode not in HEAD_MAPS:
        raise PlanError(f"head map must be one of {HEAD_MAPS} (got {mode!r})")
    maps: list[list[int] | None] = [None] * plan.num_layers
    if mode == "identity":
        return maps
    if similarity is None:
        raise PlanError("the matched head map needs a similarity analysis (run `echoatt analyze`)")
    if similarity.num_layers != plan.num_layers:
        raise PlanError(f"the analysis has {similarity.num_layers} layers but the model has {plan.num_layers}")
    for block in plan.blocks:
        for follower in block[1:]:
            source = follower - 1 if chain else block[0]
            maps[follower] = similarity.head_map(follower, source, kv_groups if mode == "grouped" else 0)
    return maps


def build_student(
    teacher: LlamaForCausalLM,
    plan: SharingPlan,
    head_map: list[list[int] | None] | None = None,
    method: str = "copy",
    lisa_rank: int | None = None,
    lisa_hidden: int | None = None,
) -> EchoAttForCausalLM:
    """The student: the teacher's weights, minus followers' q_proj/k_proj, with attention shared per `plan`.

    `method="lisa"`: each follower reads the layer before it through LiSA's head alignment and low-rank correction
    (`head_map` from `head_maps(..., chain=True)`); it starts as the head-matched copy. `method="drop"` builds the
    baseline instead: the followers' attention sub-layers are removed entirely."""
    if plan.num_layers != teacher.config.num_hidden_layers:
        raise PlanError(f"plan is for {plan.num_layers} layers, teacher has {teacher.config.num_hidden_layers}")
    if method not in METHODS:
        raise PlanError(f"method must be one of {METHODS} (got {method!r})")
    source = plan.attention_source()
    extra = {}
    if method == "drop":
        source, head_map = [DROPPED if i in plan.followers else s for i, s in enumerate(source)], None
    elif method == "lisa":
        source = [i - 1 if i in plan.followers else i for i in range(plan.num_layers)]
        extra = dict(follower_type="lisa", lisa_rank=lisa_rank, lisa_hidden=lisa_hidden)
    try:
        config = convert_config(teacher.config, EchoAttConfig, attention_source=source, head_map=head_map, **extra)
    except ValueError as err:
        raise PlanError(str(err)) from err
    config.architectures = ["EchoAttForCausalLM"]
    param = next(teacher.parameters())
    student = EchoAttForCausalLM(config).to(device=param.device, dtype=param.dtype)
    weights = teacher.state_dict()
    missing, _ = student.load_state_dict({k: v for k, v in weights.items() if k in student.state_dict()}, strict=False)
    new = [k for k in missing if not is_lisa_parameter(k)]
    if new:
        raise PlanError(f"the teacher lacks weights the student needs: {new[:3]}")
    if method == "lisa":
        for layer in plan.followers:
            own_keys = weights[f"model.layers.{layer}.self_attn.k_proj.weight"]
            init_lowrank_keys(student.model.layers[layer].self_attn.lowrank, own_keys, config.head_dim)
    return student.eval()


@torch.no_grad()
def init_lowrank_keys(lowrank, k_proj: torch.Tensor, head_dim: int) -> None:
    """Start LiSA's rank-r keys as the best rank-r part of the teacher layer's own keys (per KV head, by SVD), so
    the low-rank queries learn in the subspace where this layer's keys carry the most energy."""
    r = lowrank.rank
    for head, w in enumerate(k_proj.float().split(head_dim)):  # w: (D, C)
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        lowrank.key[head * r:(head + 1) * r] = (s[:r, None] * vh[:r]).to(lowrank.key.dtype)  # (r, C)


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    t, s = parameter_count(teacher), parameter_count(student)
    return {"teacher": t, "student": s, "removed": t - s, "removed_percent": 100.0 * (t - s) / t}


def kv_cache_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs: keys and values for ordinary layers, values only for copy followers (plus
    rank-r keys for LiSA followers), nothing for dropped attention."""
    layers = range(config.num_hidden_layers)
    if not isinstance(config, EchoAttConfig):
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes
    dims = sum(config.cached_key_dims(i) + (0 if config.is_dropped(i) else config.head_dim) for i in layers)
    return dims * config.num_key_value_heads * dtype_bytes


def save_student(
    student: EchoAttForCausalLM, tokenizer: PreTrainedTokenizerBase | None, out: str | Path, info: dict | None = None
) -> Path:
    """A checkpoint `AutoModelForCausalLM.from_pretrained` loads (with echoatt imported, or trust_remote_code), with
    the teacher's tokenizer where it has one."""
    out = Path(out)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if info is not None:
        (out / "sharing.json").write_text(json.dumps(info, indent=2))
    return out
