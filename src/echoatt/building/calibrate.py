"""Calibrate a new student before any training: refit what each follower keeps so its attention output matches the
teacher layer's on the teacher's own activations (`calibrate_followers`), and fit what stands in for a removed teacher
part — a linear attention, a narrowed FFN — in closed form (`fit_replacements`).

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

from echoatt.building.student import narrowed_mlp_weights

# What each kind of change (`plan.Change`) gets fitted before training, or None: a declaration the tests hold
# `calibrate_student` to.
FITS = {"share": "each follower's o_proj (calibrate_followers)", "drop": None,
        "linear": "the linear map (fit_replacements)", "ffn": "the kept channels' down projection (fit_replacements)"}


@dataclass
class CalibrationReport:
    """Per follower: relative error ‖ZW − Y‖² / ‖Y‖² on the calibration text before and after the refit."""

    before: dict[int, float]
    after: dict[int, float]
    windows: int

    def means(self) -> dict[str, float]:
        """Mean error over the fitted layers, before and after; nothing where no layer was fitted."""
        if not self.after:
            return {}
        return {"error_before": sum(self.before.values()) / len(self.before),
                "error_after": sum(self.after.values()) / len(self.after)}

    def summary(self, what: str = "followers' o_proj") -> str:
        means = self.means()
        return (f"calibrated {len(self.after)} layers' {what} on {self.windows} windows: sub-layer output error vs "
                f"the teacher {means['error_before']:.3f} -> {means['error_after']:.3f} (mean relative squared "
                "error)")


def _teacher_inputs(teacher, ids: torch.Tensor, layers: list[int]) -> tuple[dict, dict]:
    """The teacher's attention inputs (B, T, C) and attention outputs (B, T, C) at `layers`, one forward."""
    seen = _teacher_sublayers(teacher, ids, layers, [])
    return {i: seen["x", i] for i in layers}, {i: seen["y", i] for i in layers}


@torch.no_grad()
def calibrate_followers(student, teacher, windows: torch.Tensor, ridge: float = 1e-2, batch_size: int = 4,
                        progress: bool = True) -> CalibrationReport:
    """Refit every follower's `o_proj` of `student` (in place) by ridge least squares on `windows` (N, T) of text.

    `ridge` is relative: λ = ridge x mean diagonal of ZᵀZ, so it does not depend on the activations' scale. Use
    enough text (32 or more windows of 512 tokens for a 135M model): with few windows the fit overfits and gains
    nothing on other text."""
    config = student.config
    followers = config.followers()
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
        new = _ridge_solve(zz[i], zy[i], ridge)
        before[i] = _relative_error(zz[i], zy[i], yy[i], old)
        after[i] = _relative_error(zz[i], zy[i], yy[i], new)
        o_proj.weight.copy_(new.T.to(o_proj.weight.dtype))
    return CalibrationReport(before, after, len(windows))


def _ridge_solve(xx: torch.Tensor, xy: torch.Tensor, ridge: float) -> torch.Tensor:
    """W = (XᵀX + λI)⁻¹ XᵀY with λ = `ridge` x the mean diagonal of XᵀX (so it does not depend on the scale)."""
    lam = ridge * xx.diagonal().mean()
    return torch.linalg.solve(xx + lam * torch.eye(len(xx), dtype=xx.dtype, device=xx.device), xy)


def _bias(linear: torch.nn.Linear) -> torch.Tensor | float:
    """A linear layer's bias in float64 (C,), or 0 where it has none."""
    return 0.0 if linear.bias is None else linear.bias.double()


def _relative_error(zz: torch.Tensor, zy: torch.Tensor, yy: float, w: torch.Tensor) -> float:
    """‖ZW − Y‖² / ‖Y‖² from the summed statistics: WᵀZᵀZW − 2 WᵀZᵀY + YᵀY (traces)."""
    err = float((w * (zz @ w)).sum() - 2 * (w * zy).sum() + yy)
    return max(err, 0.0) / max(yy, 1e-30)


def replaced_layers(config) -> tuple[list[int], list[int]]:
    """The layers whose attention is a linear map, and those whose FFN is narrowed (but not dropped): what
    `fit_replacements` fits."""
    n = config.num_hidden_layers
    return ([i for i in range(n) if config.role(i) == "linear"],
            [i for i in range(n) if 0 < config.ffn_width(i) < config.intermediate_size])


def _teacher_sublayers(teacher, ids: torch.Tensor, linear: list[int], narrowed: list[int]) -> dict:
    """One teacher forward: at `linear` layers the attention's (normed) input and output, at `narrowed` layers the
    FFN's intermediate activations (the down projection's input, all channels) and output; each (B, T, ·)."""
    seen: dict = {}
    handles = []

    def keep(key):
        return lambda m, a, kw=None, out=None: seen.__setitem__(key, a[0] if a else kw["hidden_states"])

    for i in linear:
        attn = teacher.model.layers[i].self_attn
        handles.append(attn.register_forward_pre_hook(keep(("x", i)), with_kwargs=True))
        handles.append(attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("y", i), out[0])))
    for i in narrowed:
        mlp = teacher.model.layers[i].mlp
        handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("z", i), a[0])))
        handles.append(mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("f", i), out)))
    try:
        teacher(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return seen


@dataclass
class ReplacementStats:
    """What closed-form fits need from the teacher, summed over some text: per linear-attention layer (XᵀX, XᵀY, YᵀY)
    from its normed input X to its attention output Y; per FFN layer its channels ranked by contribution (most first)
    and (ZᵀZ, ZᵀY, YᵀY) over the first `widest` of them, Z their activations and Y the full FFN's output — any narrower
    width's statistics are a corner of those (the rankings nest), so one pass serves every width."""

    linear: dict[int, list]
    ranking: dict[int, torch.Tensor]
    ffn: dict[int, list]
    windows: int


@torch.no_grad()
def replacement_stats(teacher, windows: torch.Tensor, linear: list[int], widest: dict[int, int], batch_size: int = 4,
                      progress: bool = True, ranking_windows: int = 8) -> ReplacementStats:
    """The teacher's statistics for `linear` layers and FFN layers `widest` (layer -> the widest width to fit): a
    ranking pass over the first `ranking_windows` windows (mean |z_j| · ‖down_j‖: what channel j adds to the output,
    Minitron's activation importance weighed by its output weights), then one pass over all of `windows`."""
    device = next(teacher.parameters()).device
    batches = [windows[s : s + batch_size].to(device) for s in range(0, len(windows), batch_size)]
    ranking: dict[int, torch.Tensor] = {}
    if widest:
        importance = dict.fromkeys(widest, 0.0)
        for ids in tqdm(batches[: max(1, -(-ranking_windows // batch_size))], desc="rank FFN channels",
                        disable=not progress, leave=False):
            seen = _teacher_sublayers(teacher, ids, [], list(widest))
            for i in widest:
                importance[i] = importance[i] + seen["z", i].reshape(-1, seen["z", i].shape[-1]).abs().double().sum(0)
        for i in widest:
            score = importance[i] * teacher.model.layers[i].mlp.down_proj.weight.double().norm(dim=0)  # (I,)
            ranking[i] = score.argsort(descending=True)
    c = teacher.config.hidden_size
    zeros = lambda rows: [torch.zeros(rows, rows, dtype=torch.float64, device=device),
                          torch.zeros(rows, c, dtype=torch.float64, device=device), 0.0]
    stats = {"linear": {i: zeros(c) for i in linear}, "ffn": {i: zeros(w) for i, w in widest.items()}}
    for ids in tqdm(batches, desc="fit replacements", disable=not progress, leave=False):
        seen = _teacher_sublayers(teacher, ids, linear, list(widest))
        pairs = [("linear", i, seen["x", i], seen["y", i]) for i in linear]
        pairs += [("ffn", i, seen["z", i].index_select(-1, ranking[i][:w].to(device)), seen["f", i] - _bias(
            teacher.model.layers[i].mlp.down_proj)) for i, w in widest.items()]
        for kind, i, x, y in pairs:
            x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, c).double()  # (N, in), (N, C)
            entry = stats[kind][i]
            entry[0] += x.T @ x
            entry[1] += x.T @ y
            entry[2] += float((y * y).sum())
    return ReplacementStats(stats["linear"], ranking, stats["ffn"], len(windows))


@torch.no_grad()
def apply_fits(student, teacher, stats: ReplacementStats, ridge: float = 1e-2) -> CalibrationReport:
    """The student's linear attentions and narrowed FFNs fitted from `stats` (in place): W = (XᵀX + λI)⁻¹ XᵀY, λ relative
    as `calibrate_followers`' ridge; a narrowed FFN first takes the teacher's gate and up rows and down columns at its
    top-ranked channels. Errors as `fit_replacements` reports them."""
    linear, narrowed = replaced_layers(student.config)
    before, after = {}, {}
    for layer in linear + narrowed:
        if layer in linear:
            xx, xy, yy = stats.linear[layer]
            target = student.model.layers[layer].self_attn.linear_attn
        else:
            width = student.config.ffn_width(layer)
            channels = stats.ranking[layer][:width]
            own = student.model.layers[layer].mlp
            own.load_state_dict(narrowed_mlp_weights(teacher.model.layers[layer].mlp, channels))
            xx, xy, yy = stats.ffn[layer][0][:width, :width], stats.ffn[layer][1][:width], stats.ffn[layer][2]
            target = own.down_proj
        new = _ridge_solve(xx, xy, ridge)
        before[layer] = _relative_error(xx, xy, yy, target.weight.double().T.to(xx.device))
        after[layer] = _relative_error(xx, xy, yy, new)
        target.weight.copy_(new.T.to(target.weight))
    return CalibrationReport(before, after, stats.windows)


def fit_replacements(student, teacher, windows: torch.Tensor, ridge: float = 1e-2, batch_size: int = 4,
                     progress: bool = True, ranking_windows: int = 8) -> CalibrationReport:
    """Fit, in closed form on the teacher's own activations, what stands in for a removed teacher part (in place):

    - linear attention (`linear=L`): W (C x C) by ridge regression from the layer's normed input X to the teacher's
      attention output Y there, W = (XᵀX + λI)⁻¹ XᵀY (ReplaceMe, arXiv 2505.02819; Puzzle's linear attention);
    - a narrowed FFN (`ffn=L:W`): its W channels ranked by what they contribute on text (`replacement_stats`), gate and
      up rows and the down columns copied at those channels, then the down projection refitted by ridge from the kept
      channels' activations to the full FFN's output.

    `ridge` is relative, as `calibrate_followers`'. The report's errors are relative squared errors of the sub-layer's
    output on the calibration text: before (a linear map at zero is a dropped attention: 1; a narrowed FFN with its
    channels' own down columns) and after the fit."""
    linear, narrowed = replaced_layers(student.config)
    if not linear and not narrowed:
        return CalibrationReport({}, {}, 0)
    stats = replacement_stats(teacher, windows, linear, {i: student.config.ffn_width(i) for i in narrowed},
                              batch_size, progress, ranking_windows)
    return apply_fits(student, teacher, stats, ridge)


def calibrate_student(student, teacher, windows: torch.Tensor, ridge: float, progress: bool = True) -> dict:
    """Every closed-form fit a new student gets, in place: its followers' o_proj (`calibrate_followers`), its linear
    attention and narrowed FFNs (`fit_replacements`); returns their mean errors before and after."""
    followers = calibrate_followers(student, teacher, windows, ridge, progress=progress)
    replaced = fit_replacements(student, teacher, windows, ridge, progress=progress)
    for done, what in ((followers, "followers' o_proj"), (replaced, "linear attention and narrowed FFNs")):
        if done.after and progress:
            print(done.summary(what))
    return followers.means() | {f"replaced_{k}": v for k, v in replaced.means().items()}
