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


@dataclass
class BlockEffects:
    """Mean KL(teacher ‖ student) per token of sharing each block alone, on text and on the retrieval probe."""

    teacher: dict[str, float]  # the teacher's own NLL there, for scale: {"text": ..., "retrieval": ...}
    blocks: dict[tuple[int, ...], dict[str, float]]  # block -> {"text": KL, "retrieval": KL}
    settings: dict

    def loss(self, block: tuple[int, ...]) -> float:
        effect = self.blocks[tuple(block)]
        return effect["text"] + effect["retrieval"]

    def known(self, settings: dict) -> dict[tuple[int, ...], dict[str, float]]:
        """The blocks measured under exactly these settings (`commands.share.block_effect_settings`); none if they differ."""
        return self.blocks if self.settings == settings else {}

    def save(self, path: Path) -> None:
        blocks = {f"{b[0]}-{b[-1]}": v for b, v in self.blocks.items()}
        path.write_text(json.dumps({"teacher": self.teacher, "blocks": blocks, "settings": self.settings}, indent=1))

    @classmethod
    def load(cls, path: Path) -> BlockEffects | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        blocks = {}
        for name, value in data["blocks"].items():
            a, b = (int(x) for x in name.split("-"))
            blocks[tuple(range(a, b + 1))] = value
        return cls(data["teacher"], blocks, data["settings"])

    def summary(self, top: int = 6) -> str:
        ranked = sorted(self.blocks, key=self.loss)
        name = lambda b: f"{b[0]}-{b[-1]}" if len(b) > 1 else f"drop {b[0]}"
        show = lambda bs: ", ".join(f"{name(b)} {self.loss(b):+.3f}" for b in bs)
        return (f"measured loss of sharing each block alone (KL from the teacher, text + retrieval probe), over "
                f"{len(self.blocks)} blocks: cheapest {show(ranked[:top])}; dearest {show(ranked[-top:])}")


def _logits(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model(input_ids=w[None].to(device), use_cache=False).logits.float().cpu() for w in windows])


def _repeated_half(probe: torch.Tensor) -> torch.Tensor:
    """The probe (M, 2P) as labels where only the predictions of its repeated half count."""
    labels = probe.clone()
    labels[:, : probe.shape[1] // 2 + 1] = IGNORE_INDEX
    return labels


def _kl(model: torch.nn.Module, text: torch.Tensor, probe: torch.Tensor, reference: dict) -> dict[str, float]:
    """Mean KL(teacher ‖ model) per predicted token on `text` and on the repeated half of `probe`."""
    return {"text": soft_label_loss(_logits(model, text), reference["text"], text).item(),
            "retrieval": soft_label_loss(_logits(model, probe), reference["retrieval"], _repeated_half(probe)).item()}


@torch.no_grad()
def measure_block_effects(
    teacher: torch.nn.Module, spec, similarity, candidates: list[tuple[int, ...]], text: torch.Tensor,
    probe: torch.Tensor, settings: dict, progress: bool = True, repair: Callable | None = None,
) -> BlockEffects:
    """Each candidate block shared alone by `spec` (a `student.StudentSpec`: method, head map) — a candidate of one
    layer: that layer's attention dropped — compared with the teacher on `text` (N, T) windows and the `probe`
    (M, 2P). `repair(student)`, where given, repairs each candidate before it is measured (the planner then ranks
    blocks by what they cost once repaired)."""
    reference = {"text": _logits(teacher, text), "retrieval": _logits(teacher, probe)}
    base = {"text": hard_label_loss(reference["text"], text).item(),  # the teacher's own NLL, for scale
            "retrieval": hard_label_loss(reference["retrieval"], _repeated_half(probe)).item()}
    blocks = {}
    for block in tqdm(candidates, desc="measuring blocks", disable=not progress):
        alone = (dataclasses.replace(spec, plan=f"{block[0]}-{block[-1]}") if len(block) > 1  # shared...
                 else dataclasses.replace(spec, method="drop", plan=f"{block[0] - 1}-{block[0]}"))  # ...or dropped
        student, _ = alone.build(teacher, similarity)
        if repair is not None:
            repair(student)
        blocks[tuple(block)] = _kl(student, text, probe, reference)
        del student
    return BlockEffects(base, blocks, settings)
