"""Copy: build the shared-attention student from a teacher and a sharing plan, and count what it saves."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from echoatt.analysis import Similarity
from echoatt.modeling import DROPPED, EchoAttConfig, EchoAttForCausalLM
from echoatt.plan import PlanError, SharingPlan
from echoatt.teacher import convert_config

HEAD_MAPS = ("matched", "identity")
METHODS = ("copy", "drop")


def head_maps(plan: SharingPlan, similarity: Similarity | None, mode: str = "matched") -> list[list[int] | None]:
    """Per layer, the leader head each follower head reads: most similar (`matched`) or the same index (`identity`)."""
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
            maps[follower] = similarity.head_map(follower, block[0])
    return maps


def build_student(
    teacher: LlamaForCausalLM,
    plan: SharingPlan,
    head_map: list[list[int] | None] | None = None,
    method: str = "copy",
) -> EchoAttForCausalLM:
    """The student: the teacher's weights, minus followers' q_proj/k_proj, with attention shared per `plan`.

    `method="drop"` builds the baseline instead: the followers' attention sub-layers are removed entirely."""
    if plan.num_layers != teacher.config.num_hidden_layers:
        raise PlanError(f"plan is for {plan.num_layers} layers, teacher has {teacher.config.num_hidden_layers}")
    if method not in METHODS:
        raise PlanError(f"method must be one of {METHODS} (got {method!r})")
    source = plan.attention_source()
    if method == "drop":
        source, head_map = [DROPPED if i in plan.followers else s for i, s in enumerate(source)], None
    config = convert_config(teacher.config, EchoAttConfig, attention_source=source, head_map=head_map)
    config.architectures = ["EchoAttForCausalLM"]
    param = next(teacher.parameters())
    student = EchoAttForCausalLM(config).to(device=param.device, dtype=param.dtype)
    keep = student.state_dict().keys()
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in keep}, strict=True)
    return student.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    t, s = parameter_count(teacher), parameter_count(student)
    return {"teacher": t, "student": s, "removed": t - s, "removed_percent": 100.0 * (t - s) / t}


def kv_cache_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs: keys and values for ordinary layers, values only for followers, nothing for
    dropped attention."""
    layers = range(config.num_hidden_layers)
    followers = sum(config.is_follower(i) for i in layers) if isinstance(config, EchoAttConfig) else 0
    dropped = sum(config.is_dropped(i) for i in layers) if isinstance(config, EchoAttConfig) else 0
    per_layer = config.num_key_value_heads * config.head_dim * dtype_bytes
    return per_layer * (2 * config.num_hidden_layers - followers - 2 * dropped)


def save_student(
    student: EchoAttForCausalLM, tokenizer: PreTrainedTokenizerBase, out: str | Path, info: dict | None = None
) -> Path:
    """A checkpoint `AutoModelForCausalLM.from_pretrained` loads (with echoatt imported, or trust_remote_code)."""
    out = Path(out)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if info is not None:
        (out / "sharing.json").write_text(json.dumps(info, indent=2))
    return out
