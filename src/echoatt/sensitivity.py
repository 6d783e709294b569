"""What sharing each candidate block costs, measured rather than predicted: build the student with that block alone,
and compare its next-token distributions with the teacher's on a window of text and on the retrieval probe
(`metrics.repeated_tokens`).

Similar attention maps on prose do not say which layers retrieve from context (a copied map that is alike on average
can lose the heads that do); the probe does, and the text catches the rest. A block's loss is the sum of the two mean
KL(teacher ‖ student) per token (on the probe, over its repeated half), so a budget plan (`planners.from_budget`)
avoids the blocks that cost either. KL rather than the change in loss on the next token: it sees every change of the
distribution (what distillation will have to undo), is never negative, and is far less noisy on one window. Blocks are
measured uncalibrated and one at a time: a ranking, not a forecast of the whole plan.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from echoatt.losses import IGNORE_INDEX, hard_label_loss, soft_label_loss
from echoatt.repair import teacher_stream


def candidate_name(candidate: tuple) -> str:
    """A budget candidate as the plan string names it: `4-6` (a block), `drop=7`, `linear=7`, `ffn=7:768`."""
    if candidate[0] in ("linear", "ffn"):
        return f"linear={candidate[1]}" if candidate[0] == "linear" else f"ffn={candidate[1]}:{candidate[2]}"
    return f"{candidate[0]}-{candidate[-1]}" if len(candidate) > 1 else f"drop={candidate[0]}"


def candidate_of(name: str) -> tuple:
    """`candidate_name` read back (and the older `7-7` for a drop)."""
    if name.startswith("linear="):
        return ("linear", int(name.removeprefix("linear=")))
    if name.startswith("ffn="):
        layer, width = name.removeprefix("ffn=").split(":")
        return ("ffn", int(layer), int(width))
    if name.startswith("drop="):
        return (int(name.removeprefix("drop=")),)
    a, b = (int(x) for x in name.split("-"))
    return tuple(range(a, b + 1))


@dataclass
class BlockEffects:
    """Mean KL(teacher ‖ student) per token of each candidate change alone — a shared block, a dropped or linear
    attention, a narrowed FFN — on text and on the retrieval probe."""

    teacher: dict[str, float]  # the teacher's own NLL there, for scale: {"text": ..., "retrieval": ...}
    blocks: dict[tuple, dict[str, float]]  # candidate -> {"text": KL, "retrieval": KL}
    settings: dict

    def loss(self, block: tuple) -> float:
        effect = self.blocks[tuple(block)]
        return effect["text"] + effect["retrieval"]

    def known(self, settings: dict) -> dict[tuple[int, ...], dict[str, float]]:
        """The blocks measured under exactly these settings (`commands.share.block_effect_settings`); none if they differ."""
        return self.blocks if self.settings == settings else {}

    def save(self, path: Path) -> None:
        blocks = {candidate_name(b): v for b, v in self.blocks.items()}
        path.write_text(json.dumps({"teacher": self.teacher, "blocks": blocks, "settings": self.settings}, indent=1))

    @classmethod
    def load(cls, path: Path) -> BlockEffects | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["teacher"], {candidate_of(k): v for k, v in data["blocks"].items()}, data["settings"])

    def summary(self, top: int = 6) -> str:
        ranked = sorted(self.blocks, key=self.loss)
        show = lambda bs: ", ".join(f"{candidate_name(b)} {self.loss(b):+.3f}" for b in bs)
        return (f"measured loss of sharing each block alone (KL from the teacher, text + retrieval probe), over "
                f"{len(self.blocks)} blocks: cheapest {show(ranked[:top])}; dearest {show(ranked[-top:])}")


def _logits(model: torch.nn.Module, windows: torch.Tensor, start: int = 0,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, T, V) of `windows`; with `hidden` (N, T, C), the teacher's hidden states at decoder layer `start`'s
    input, the model runs from that layer on (the layers below it are the teacher's: the same states)."""
    device = next(model.parameters()).device
    if hidden is None:
        return torch.cat([model(input_ids=w[None].to(device), use_cache=False).logits.float().cpu() for w in windows])
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        return torch.cat([model(inputs_embeds=h[None].to(device), use_cache=False).logits.float().cpu() for h in hidden])
    finally:
        model.model.layers = layers


def first_changed(candidate: tuple) -> int:
    """The lowest layer a candidate changes: below it the student is the teacher."""
    return candidate[1] if candidate[0] in ("linear", "ffn") else candidate[0]


def _repeated_half(probe: torch.Tensor) -> torch.Tensor:
    """The probe (M, 2P) as labels where only the predictions of its repeated half count."""
    labels = probe.clone()
    labels[:, : probe.shape[1] // 2 + 1] = IGNORE_INDEX
    return labels


def _kl(model: torch.nn.Module, text: torch.Tensor, probe: torch.Tensor, reference: dict,
        start: int = 0) -> dict[str, float]:
    """Mean KL(teacher ‖ model) per predicted token on `text` and on the repeated half of `probe`, the model run from
    decoder layer `start` on the teacher's hidden states there (`reference["hidden"]`)."""
    hidden = reference.get("hidden")
    feed = lambda name: {"start": start, "hidden": hidden[name][start]} if hidden and start else {}
    return {"text": soft_label_loss(_logits(model, text, **feed("text")), reference["text"], text).item(),
            "retrieval": soft_label_loss(_logits(model, probe, **feed("retrieval")), reference["retrieval"],
                                         _repeated_half(probe)).item()}


def _hidden_inputs(teacher: torch.nn.Module, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """The teacher's hidden state at each decoder layer's input, (N, T, C) per layer, window by window."""
    device = next(teacher.parameters()).device
    layers = list(range(teacher.config.num_hidden_layers))
    each = [teacher_stream(teacher, w[None].to(device), layers)[0] for w in windows]
    return {i: torch.cat([e[i] for e in each]) for i in layers}


@torch.no_grad()
def measure_block_effects(
    teacher: torch.nn.Module, spec, similarity, candidates: list[tuple], text: torch.Tensor,
    probe: torch.Tensor, settings: dict, progress: bool = True, repair: Callable | None = None,
    fits: Callable | None = None,
) -> BlockEffects:
    """Each candidate block shared alone by `spec` (a `student.StudentSpec`: method, head map) — a candidate of one
    layer: that layer's attention dropped; ("linear", L): its attention a linear map; ("ffn", L, W): its FFN at W
    channels — compared with the teacher on `text` (N, T) windows and the `probe` (M, 2P). `fits(student)` fits a
    linear map or a narrowed FFN in closed form (`calibrate.apply_fits`, from statistics on other text) before it is
    measured, as `share` will fit it; `repair(student)`, where given, repairs each candidate before it is measured
    (the planner then ranks blocks by what they cost once repaired)."""
    reference = {"text": _logits(teacher, text), "retrieval": _logits(teacher, probe),
                 "hidden": {"text": _hidden_inputs(teacher, text), "retrieval": _hidden_inputs(teacher, probe)}}
    base = {"text": hard_label_loss(reference["text"], text).item(),  # the teacher's own NLL, for scale
            "retrieval": hard_label_loss(reference["retrieval"], _repeated_half(probe)).item()}
    blocks = {}
    for block in tqdm(candidates, desc="measuring blocks", disable=not progress):
        if block[0] in ("linear", "ffn"):  # a replacement, fitted as share fits it
            alone = dataclasses.replace(spec, plan=candidate_name(block))
        else:
            alone = (dataclasses.replace(spec, plan=f"{block[0]}-{block[-1]}") if len(block) > 1  # shared...
                     else dataclasses.replace(spec, method="drop", plan=f"{block[0] - 1}-{block[0]}"))  # ...or dropped
        student, _ = alone.build(teacher, similarity, share=repair is None)  # the teacher's tensors, unless trained
        if block[0] in ("linear", "ffn") and fits is not None:
            fits(student)
        if repair is not None:
            repair(student)
        blocks[tuple(block)] = _kl(student, text, probe, reference, first_changed(block))
        del student
    return BlockEffects(base, blocks, settings)
