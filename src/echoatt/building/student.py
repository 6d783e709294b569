"""Build the shared-attention student from a teacher and a sharing plan (`StudentSpec`, the named `VARIANTS`), and
count what it saves."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from echoatt.common import closest
from echoatt.model.configuration_echoatt import (
    DROPPED,
    FOLLOWER_TYPES,
    LINEAR,
    EchoAttConfig,
    head_dim_of,
    is_lisa_parameter,
)
from echoatt.model.modeling_echoatt import EchoAttForCausalLM
from echoatt.planning import planners
from echoatt.planning.analysis import Similarity
from echoatt.planning.cost_model import bound
from echoatt.planning.plan import PlanError, SharingPlan
from echoatt.run.rundir import SharingInfo

HEAD_MAPS = ("matched", "grouped", "identity")
SYNTAX_LAYERS = 256  # a plan's syntax is checked against this many layers before the teacher's count is known
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


def student_config(
    teacher_config,
    plan: SharingPlan,
    head_map: list[list[int] | None] | None = None,
    method: str = "copy",
    lisa_rank: int | None = None,
    lisa_hidden: int | None = None,
) -> EchoAttConfig:
    """The student's config for `plan` (no weights: the planner costs candidate plans with it)."""
    if plan.num_layers != teacher_config.num_hidden_layers:
        raise PlanError(f"plan is for {plan.num_layers} layers, teacher has {teacher_config.num_hidden_layers}")
    if method not in METHODS:
        raise PlanError(f"method must be one of {METHODS} (got {method!r})")
    if method == "drop":
        plan, head_map = plan.dropping_followers(), None
    source = plan.attention_source()
    extra = {}
    if method == "lisa":
        source = [i - 1 if i in plan.followers else i for i in range(plan.num_layers)]
        extra = {"follower_type": "lisa", "lisa_rank": lisa_rank, "lisa_hidden": lisa_hidden}
    source = [DROPPED if i in plan.dropped else s for i, s in enumerate(source)]
    source = [LINEAR if i in plan.linear else s for i, s in enumerate(source)]
    full = teacher_config.intermediate_size
    if any(width > full for _, width in plan.ffn):
        raise PlanError(f"plan {plan.ffn_spec()} widens an FFN past the teacher's {full} channels: widths run from 0 "
                        f"(no FFN) to {full}")
    if plan.ffn:
        extra["intermediate_sizes"] = [plan.ffn_width(i, full) for i in range(plan.num_layers)]
    try:
        config = EchoAttConfig.from_teacher(teacher_config, attention_source=source, head_map=head_map, **extra)
    except ValueError as err:
        raise PlanError(str(err)) from err
    config.architectures = ["EchoAttForCausalLM"]
    return config


def plan_bounds(teacher_config, config: EchoAttConfig) -> dict[str, float]:
    """What a student config promises, by the cost model, at the settings plans are chosen for (bf16): `prefill`
    (1 x 512 tokens), `decode` (16 sequences, 1024 tokens of context) as teacher time / student time, and `kv`
    (KV-cache bytes per token) as student / teacher."""
    fused = {"teacher_eager": False, "student_eager": False, "dtype_bytes": 2}
    return {
        "prefill": bound(teacher_config, config, B=1, T=512, P=0, logits=1, **fused).value,
        "decode": bound(teacher_config, config, B=16, T=1, P=1024, **fused).value,
        "kv": kv_cache_bytes_per_token(config) / kv_cache_bytes_per_token(teacher_config),
    }


def build_student(
    teacher: LlamaForCausalLM,
    plan: SharingPlan,
    head_map: list[list[int] | None] | None = None,
    method: str = "copy",
    lisa_rank: int | None = None,
    lisa_hidden: int | None = None,
    share: bool = False,
) -> EchoAttForCausalLM:
    """The student: the teacher's weights, minus followers' q_proj/k_proj, with attention shared per `plan`.

    `method="lisa"`: each follower reads the layer before it through LiSA's head alignment and low-rank correction
    (`head_map` from `head_maps(..., chain=True)`); it starts as the head-matched copy. `method="drop"` builds the
    baseline instead: the followers' attention sub-layers are removed entirely. A plan's linear attention starts at
    zero and a narrowed FFN keeps the channels its weights rank first (`weight_ranked_channels`): both are fitted on
    text by `calibrate.fit_replacements`.

    `share` (to measure a candidate, never to train one): the student holds the teacher's own tensors rather than
    copies (and its rotary embedding), built without initialising anything — for plans whose every weight comes from
    the teacher (not LiSA's)."""
    config = student_config(teacher.config, plan, head_map, method, lisa_rank, lisa_hidden)
    param = next(teacher.parameters())
    share = share and method != "lisa"
    with torch.device("meta" if share else param.device):  # where the teacher is (a 7B one on a GPU: not on a CPU)
        student = EchoAttForCausalLM(config).to(dtype=param.dtype)
    weights = teacher.state_dict()
    own = student.state_dict()
    kept = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    for layer, width in plan.ffn:
        if 0 < width < config.intermediate_size:
            mlp = teacher.model.layers[layer].mlp
            kept |= narrowed_mlp_weights(mlp, weight_ranked_channels(mlp, width), f"model.layers.{layer}.mlp")
    kept |= {f"model.layers.{i}.self_attn.linear_attn.weight": torch.zeros_like(own[f"model.layers.{i}.self_attn."
             "linear_attn.weight"], device=param.device) for i in plan.linear}  # dropped until fitted
    missing, _ = student.load_state_dict(kept, strict=False, assign=share)
    if share:
        student.model.rotary_emb = teacher.model.rotary_emb  # its buffers are not in the state dict
    new = [k for k in missing if not is_lisa_parameter(k)]
    if new:
        raise PlanError(f"the teacher lacks weights the student needs: {new[:3]}")
    if method == "lisa":
        for layer in plan.followers:
            own_keys = weights[f"model.layers.{layer}.self_attn.k_proj.weight"]
            init_lowrank_keys(student.model.layers[layer].self_attn.lowrank, own_keys, config.head_dim)
    return student.eval()


@torch.no_grad()
def weight_ranked_channels(mlp: torch.nn.Module, width: int) -> torch.Tensor:
    """The `width` intermediate channels of a gated FFN whose weights are largest (‖gate_j‖·‖up_j‖·‖down_j‖), in
    ascending order: a data-free stand-in for the activation ranking calibration uses (`calibrate.py`)."""
    score = (mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)
             * mlp.down_proj.weight.float().norm(dim=0))  # (I,)
    return score.topk(width).indices.sort().values


def narrowed_mlp_weights(mlp: torch.nn.Module, channels: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """A gated FFN's weights (and biases) at the intermediate `channels` (W,), named as in the student under `prefix`
    (none: as in the FFN itself)."""
    prefix = f"{prefix}." if prefix else ""
    out = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        linear = getattr(mlp, name)
        dim = 1 if name == "down_proj" else 0
        out[f"{prefix}{name}.weight"] = linear.weight.index_select(dim, channels.to(linear.weight.device))
        if linear.bias is not None:
            out[f"{prefix}{name}.bias"] = (linear.bias if name == "down_proj"
                                            else linear.bias.index_select(0, channels.to(linear.bias.device)))
    return out


@torch.no_grad()
def init_lowrank_keys(lowrank, k_proj: torch.Tensor, head_dim: int) -> None:
    """Start LiSA's rank-r keys as the best rank-r part of the teacher layer's own keys (per KV head, by SVD), so
    the low-rank queries learn in the subspace where this layer's keys carry the most energy."""
    r = lowrank.rank
    for head, w in enumerate(k_proj.float().split(head_dim)):  # w: (D, C)
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        lowrank.key[head * r:(head + 1) * r] = (s[:r, None] * vh[:r]).to(lowrank.key.dtype)  # (r, C)


@dataclass(frozen=True)
class StudentSpec:
    """Which student: a plan, a follower method, a head map and LiSA's sizes — all `share` needs besides the
    teacher (and, for matched maps and threshold plans, its similarity analysis)."""

    plan: str = "k=2"
    method: str = "copy"
    head_map: str = "matched"
    lisa_rank: int = 0  # 0: head_dim // 6
    lisa_hidden: int = 0  # 0: the head count

    def check(self, num_layers: int | None = None) -> None:
        """Refuse unknown names and a misread plan before any analysis is run; without the teacher's layer count
        (before it loads), the plan's syntax only."""
        for flag, value, known in (("--method", self.method, METHODS), ("--head-map", self.head_map, HEAD_MAPS)):
            if value not in known:
                raise PlanError(f"{flag} must be one of {', '.join(known)} (got {value!r}){closest(value, known)}")
        n = num_layers or SYNTAX_LAYERS
        planners.parse(self.plan, n, np.zeros((n, n)), check_only=True)
        if self.method == "drop" and self.plan.strip().startswith("budget="):
            asked = sorted(set(planners.budget_options(self.plan.strip())) & {"linear", "ffn"})
            if asked:  # attention drop ranks layers by its own criterion, which knows nothing of these
                raise PlanError(f"--method drop drops attention and nothing else, but plan {self.plan!r} asks for "
                                f"{' and '.join(',' + a for a in asked)}: use --method copy (the default), whose budget "
                                "plans weigh dropped attention beside them")

    @property
    def mapped(self) -> bool:
        """Followers read mapped heads (copy, LiSA); dropped attention reads nothing."""
        return self.method in FOLLOWER_TYPES

    @property
    def needs_analysis(self) -> bool:
        return (self.mapped and self.head_map != "identity") or self.plan.startswith(("threshold=", "budget="))

    def without_text(self) -> StudentSpec:
        """What can be built for a teacher without tokenizer (no analysis, nothing to measure): a `budget=k=N` plan
        becomes blind `k=N`, a budget of named targets (the default's) blind `k=2`; anything else that needs the
        analysis stays as it is (and is refused, saying why)."""
        if not self.plan.strip().startswith("budget=") or (self.mapped and self.head_map != "identity"):
            return self
        return dataclasses.replace(self, plan=f"k={planners.budget_options(self.plan.strip()).get('k', 2)}")

    def head_maps(self, teacher_config, plan: SharingPlan, similarity: Similarity | None):
        """Per layer, the source head each follower head reads (None where nothing is mapped)."""
        if not self.mapped:
            return None
        groups = teacher_config.num_attention_heads // teacher_config.num_key_value_heads
        return head_maps(plan, similarity, self.head_map, chain=self.method == "lisa", kv_groups=groups)

    def sharing_plan(self, teacher_config, similarity: Similarity | None, block_loss=None, joint=None) -> SharingPlan:
        """The plan `self.plan` names; a budget is met by the cost model's bounds for this method, at the least loss
        `block_loss` (measured: `sensitivity.BlockEffects.loss`) or, without it, the similarity predicts — except
        attention drop, which takes the layers its own criterion ranks first (`Similarity.redundancy`) and drops
        the attention of every layer a plan would make follow (`SharingPlan.dropping_followers`). `joint`
        measures a whole plan (`sensitivity.joint_loss`), for a `long` budget."""
        matched = similarity.head_matched if similarity else None

        def bounds(plan: SharingPlan) -> dict[str, float]:  # with the head maps the student will have
            maps = self.head_maps(teacher_config, plan, similarity) if similarity is not None else None
            config = student_config(teacher_config, plan, maps, self.method, self.lisa_rank or None,
                                    self.lisa_hidden or None)
            return plan_bounds(teacher_config, config)

        plan = planners.parse(self.plan, teacher_config.num_hidden_layers, matched,
                              adjacent=self.method == "lisa", bounds=bounds, block_loss=block_loss,
                              ranking=self.drop_ranking(similarity), intermediate=teacher_config.intermediate_size,
                              joint=joint)
        return plan.dropping_followers() if self.method == "drop" else plan

    def drop_ranking(self, similarity: Similarity | None) -> list[int] | None:
        """For attention drop with a measured LLM-Drop criterion: the layers, most redundant attention first."""
        if self.method != "drop" or similarity is None or similarity.redundancy is None:
            return None
        return [int(i) for i in np.argsort(-similarity.redundancy, kind="stable")]

    def build(
        self, teacher: LlamaForCausalLM, similarity: Similarity | None, maps: list[list[int] | None] | None = None,
        block_loss=None, share: bool = False, joint=None,
    ) -> tuple[EchoAttForCausalLM, SharingPlan]:
        """The student and its plan; `maps` (one per layer, read at the followers) overrides the analysis's head maps
        (e.g. for random weights, which have no analysis); `block_loss` and `joint` as `sharing_plan` takes them;
        `share` as `build_student` takes it."""
        config = teacher.config
        plan = self.sharing_plan(config, similarity, block_loss, joint)
        if maps is not None:
            maps = [m if i in plan.followers else None for i, m in enumerate(maps)]
        else:
            maps = self.head_maps(config, plan, similarity)
        student = build_student(teacher, plan, maps, self.method, self.lisa_rank or None, self.lisa_hidden or None,
                                share)
        return student, plan


@dataclass(frozen=True)
class Variant:
    """A named student of `compare`: its label, the spec fields it sets, and what it adds to a budget plan."""

    label: str
    method: str
    head_map: str
    budget_options: str = ""  # ",drop": a mixed plan (shared blocks and dropped attention); ",drop-only": measured drops


VARIANTS = {
    "drop": Variant("attention drop", "drop", "identity"),
    "identity": Variant("plain copy", "copy", "identity"),
    "matched": Variant("head-matched copy", "copy", "matched"),
    "grouped": Variant("head-matched copy within KV groups", "copy", "grouped"),
    "lisa": Variant("LiSA", "lisa", "matched"),
    "mixed": Variant("shared and dropped (mixed)", "copy", "matched", ",drop"),
    "drop-only": Variant("dropped by measured loss (llama.cpp-servable)", "copy", "matched", ",drop-only"),
    "wide": Variant("shared, dropped or linear attention and narrowed FFNs (the wider space)", "copy", "matched",
                    ",drop,linear,ffn"),
    "wide-only": Variant("dropped or linear attention and narrowed FFNs (llama.cpp-servable)", "copy", "matched",
                         ",drop-only,linear,ffn"),
}


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_report(teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    t, s = parameter_count(teacher), parameter_count(student)
    return {"teacher": t, "student": s, "removed": t - s, "removed_percent": 100.0 * (t - s) / t}


def kv_cache_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs: keys and values for ordinary layers, values only for copy followers (plus
    rank-r keys for LiSA followers), nothing for dropped or linear attention."""
    layers = range(config.num_hidden_layers)
    if not isinstance(config, EchoAttConfig):
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype_bytes
    dims = sum(config.cached_key_dims(i) + config.cached_value_dims(i) for i in layers)
    return dims * config.num_key_value_heads * dtype_bytes


def save_student(
    student: EchoAttForCausalLM, tokenizer: PreTrainedTokenizerBase | None, out: str | Path,
    info: SharingInfo | None = None,
) -> Path:
    """A checkpoint `AutoModelForCausalLM.from_pretrained` loads (with echoatt imported, or trust_remote_code), with
    the teacher's tokenizer where it has one and what the student is (`sharing.json`)."""
    out = Path(out)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if info is not None:
        info.save(out)
    return out
