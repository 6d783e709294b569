"""Calibrate a new student before any training: refit what each follower keeps so its attention output matches the
teacher layer's on the teacher's own activations.

A follower keeps its V and O but attends with borrowed probabilities, so its output drifts from the teacher's. The
output is linear in `o_proj`: with Z (N, H*D) the follower's per-head attention outputs (before `o_proj`) and
Y (N, C) the teacher layer's attention output at the same positions less `o_proj`'s bias b where the family has one
(kept as it is), the best `o_proj` weight in the least-squares sense is W = (ZᵀZ + λI)⁻¹ Zᵀ(Y − b) — one closed-form
ridge solve per follower, from statistics summed window by window (ZᵀZ is (H*D)², ZᵀY is (H*D) x C: never all the
activations at once).

Both Z and Y are taken on the teacher's stream: each student attention sub-layer is fed the teacher's input at that
layer (a forward pre-hook swaps it in), so leaders hand on exactly the teacher's attention and every follower is fitted
independently of the others. This works for any plan and follower type (copy, LiSA); dropped layers keep nothing to
fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class CalibrationReport:
    """Per follower: relative error ‖ZW − Y‖² / ‖Y‖² on the calibration text before and after the refit."""

    before: dict[int, float]
    after: dict[int, float]
    windows: int

    def means(self) -> dict[str, float]:
        """Mean error over the followers, before and after."""
        return {"error_before": sum(self.before.values()) / max(len(self.before), 1),
                "error_after": sum(self.after.values()) / max(len(self.after), 1)}

    def summary(self) -> str:
        means = self.means()
        return (f"calibrated {len(self.after)} followers' o_proj on {self.windows} windows: attention-output error "
                f"vs the teacher {means['error_before']:.3f} -> {means['error_after']:.3f} (mean relative squared "
                "error)")


def _teacher_inputs(teacher, ids: torch.Tensor, layers: list[int]) -> tuple[dict, dict]:
    """The teacher's attention inputs (B, T, C) and attention outputs (B, T, C) at `layers`, one forward."""
    inputs, outputs, handles = {}, {}, []
    for i in layers:
        attn = teacher.model.layers[i].self_attn
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True))
        handles.append(attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0])))
    try:
        teacher(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


@torch.no_grad()
def calibrate_followers(student, teacher, windows: torch.Tensor, ridge: float = 1e-2, batch_size: int = 4,
                        progress: bool = True) -> CalibrationReport:
    """Refit every follower's `o_proj` of `student` (in place) by ridge least squares on `windows` (N, T) of text.

    `ridge` is relative: λ = ridge x mean diagonal of ZᵀZ, so it does not depend on the activations' scale. Use
    enough text (32 or more windows of 512 tokens for a 135M model): with few windows the fit overfits and gains
    nothing on other text."""
    config = student.config
    followers = [i for i in config.followers() if config.role(i) != "dropped"]
    if not followers:
        return CalibrationReport({}, {}, 0)
    feeds = list(range(config.num_hidden_layers))  # every attention gets the teacher's input: leaders too
    device = next(student.parameters()).device
    width = config.num_attention_heads * config.head_dim
    zz = {i: torch.zeros(width, width, dtype=torch.float64, device=device) for i in followers}
    zy = {i: torch.zeros(width, config.hidden_size, dtype=torch.float64, device=device) for i in followers}
    yy = dict.fromkeys(followers, 0.0)
    zs: dict[int, torch.Tensor] = {}
    biases = {i: _bias(student.model.layers[i].self_attn.o_proj) for i in followers}  # kept: the layer adds it back
    feed: dict[int, torch.Tensor] = {}
    handles = []
    for i in feeds:
        attn = student.model.layers[i].self_attn
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: (a, {**kw, "hidden_states": feed[i]}), with_kwargs=True))
    for i in followers:
        o_proj = student.model.layers[i].self_attn.o_proj
        handles.append(o_proj.register_forward_pre_hook(lambda m, a, i=i: zs.__setitem__(i, a[0])))
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", disable=not progress, leave=False):
            ids = windows[start : start + batch_size].to(device)
            inputs, targets = _teacher_inputs(teacher, ids, feeds)
            feed.update(inputs)
            student(input_ids=ids, use_cache=False)
            for i in followers:
                z = zs[i].reshape(-1, width).double()  # (N, H*D)
                y = targets[i].reshape(-1, config.hidden_size).double() - biases[i]  # (N, C): what W must give
                zz[i] += z.T @ z
                zy[i] += z.T @ y
                yy[i] += float((y * y).sum())
    finally:
        for h in handles:
            h.remove()
    before, after = {}, {}
    for i in followers:
        o_proj = student.model.layers[i].self_attn.o_proj
        old = o_proj.weight.double().T  # (H*D, C)
        lam = ridge * zz[i].diagonal().mean()
        new = torch.linalg.solve(zz[i] + lam * torch.eye(width, dtype=torch.float64, device=device), zy[i])
        before[i] = _relative_error(zz[i], zy[i], yy[i], old)
        after[i] = _relative_error(zz[i], zy[i], yy[i], new)
        o_proj.weight.copy_(new.T.to(o_proj.weight.dtype))
    return CalibrationReport(before, after, len(windows))


def _bias(linear: torch.nn.Linear) -> torch.Tensor | float:
    """A linear layer's bias in float64 (C,), or 0 where it has none."""
    return 0.0 if linear.bias is None else linear.bias.double()


def _relative_error(zz: torch.Tensor, zy: torch.Tensor, yy: float, w: torch.Tensor) -> float:
    """‖ZW − Y‖² / ‖Y‖² from the summed statistics: WᵀZᵀZW − 2 WᵀZᵀY + YᵀY (traces)."""
    err = float((w * (zz @ w)).sum() - 2 * (w * zy).sum() + yy)
    return max(err, 0.0) / max(yy, 1e-30)
