"""Local repair: every layer the plan changed is trained alone to give the teacher layer's output from the teacher
layer's input (blockwise local distillation, as Puzzle, arXiv 2411.19146), before the global distillation stitches the
layers together.

A changed layer is a dropped- or linear-attention layer, a follower (copy or LiSA) or a narrowed FFN's; with `next_too` the layer after each is
repaired too, fed the repaired layer's output, so it learns to take what the changed layer now gives. What trains is
what those layers keep (a dropped layer: its MLP and norms; a follower: V, O, MLP, norms and LiSA's parts); leaders and
every other layer stay frozen.

One step costs one teacher forward and a forward and backward of the changed layers (and their leaders' forward,
which hands them the teacher's own attention): the student runs only those layers, each fed the teacher's hidden
state at its input (streamed batch by batch, never stored), so one layer's error trains that layer (and, with
`next_too`, the changed layer before it) and nothing else.
The loss is each layer's squared output error relative to the teacher layer's own change of the stream
(`losses.layer_output_loss`): 1 means as wrong as skipping the layer.

`LocalLoss` has `KDLoss`'s call shape, so the distillation loop (`distill.py`: accelerate, resume, checkpoints,
progress, logs) runs the repair stage as it runs the global one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from echoatt.training.losses import NO_LOGITS, layer_output_loss


def changed_layers(config) -> list[int]:
    """Layers that differ from the teacher's: their attention (followers, dropped or linear attention) or their FFN
    (narrowed or dropped)."""
    return config.changed()


def repaired_layers(config, next_too: bool) -> list[int]:
    """What the repair trains and scores: the changed layers, and with `next_too` the layer after each."""
    changed = set(changed_layers(config))
    after = {i + 1 for i in changed if i + 1 < config.num_hidden_layers} if next_too else set()
    return sorted(changed | after)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # decoder layers return a tensor (a tuple before transformers 5)


def teacher_stream(teacher, ids: torch.Tensor, layers: list[int]) -> tuple[dict, dict]:
    """The teacher's decoder-layer inputs and outputs (B, T, C) at `layers`, from one forward without logits."""
    inputs, outputs, handles = {}, {}, []
    for i in layers:
        layer = teacher.model.layers[i]
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, a[0] if a else kw["hidden_states"]), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, _output(out))))
    try:
        teacher(input_ids=ids, use_cache=False, logits_to_keep=NO_LOGITS.to(ids.device))
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


@contextlib.contextmanager
def only_layers(model: nn.Module, keep: list[int], feed: dict[int, torch.Tensor], outputs: dict) -> Iterator[None]:
    """Within the block, `model` (an echoatt student) runs only its decoder layers `keep`, in order; layer i in `feed`
    takes `feed[i]` as its input instead of the previous kept layer's output, and every kept layer's output is put in
    `outputs`."""
    base = model.model
    layers, handles = base.layers, []
    for i in keep:
        if i in feed:
            handles.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: ((feed[i], *a[1:]), kw) if a else (a, {**kw, "hidden_states": feed[i]}),
                with_kwargs=True))
        handles.append(layers[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, _output(out))))
    base.layers = nn.ModuleList([layers[i] for i in keep])  # each keeps its own layer_idx: caches and handoffs agree
    try:
        yield
    finally:
        base.layers = layers
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class LocalLoss:
    """The repair objective: the mean over repaired layers of `layer_output_loss`, each changed layer (and leader) fed
    the teacher's input; with `next_too`, the layer after a changed one is fed that layer's repaired output."""

    next_too: bool = True

    def __call__(self, student, teacher, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        model = student.module if hasattr(student, "module") else student  # under DDP, the model it wraps
        config = model.config
        changed = changed_layers(config)
        scored = repaired_layers(config, self.next_too)
        leaders = {config.attention_source[i] for i in changed if config.follows(i)}
        keep = sorted(set(scored) | leaders)
        fed = set(changed) | leaders | {i for i in keep if i - 1 not in changed}  # the rest follow a changed layer
        with torch.no_grad():
            t_in, t_out = teacher_stream(teacher, ids, keep)
        s_out: dict[int, torch.Tensor] = {}
        with only_layers(model, keep, {i: t_in[i] for i in fed}, s_out):
            student(input_ids=ids, use_cache=False, logits_to_keep=NO_LOGITS.to(ids.device))
        per_layer = {i: layer_output_loss(s_out[i], t_in[i], t_out[i]) for i in scored}
        loss = torch.stack(list(per_layer.values())).mean()
        return {"loss": loss, **{f"layer_{i}": v.detach() for i, v in per_layer.items()}}


def repair_briefly(student, teacher, windows: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 2) -> None:
    """`steps` of local repair of `student` in place, in memory, on `windows` (N, T) taken in turn: how the budget
    planner costs a candidate block once repaired (`sensitivity.measure_block_effects`), as Puzzle scores its
    candidates after their local distillation."""
    layers = repaired_layers(student.config, next_too=True)
    params = [p for i in layers for p in student.model.layers[i].parameters()]
    student.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    loss = LocalLoss(next_too=True)
    with torch.enable_grad():
        for step in range(steps):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(windows)
            loss(student, teacher, windows[rows])["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    student.requires_grad_(False)
