"""What sharing each candidate block costs, measured rather than predicted: build the student with that block alone,
and compare its next-token distributions with the teacher's on a window of text and on the retrieval probe
(`metrics.repeated_tokens`).

Similar attention maps on prose do not say which layers retrieve from context (a copied map that is alike on average
can lose the heads that do); the probe does, and the text catches the rest. A block's loss is the sum of the two mean
KL(teacher ‖ student) per token (on the probe, over its repeated half), so a budget plan (`planners.from_budget`)
avoids the blocks that cost either. KL rather than the change in loss on the next token: it sees every change of the
distribution (what distillation will have to undo), is never negative, and is far less noisy on one window. Blocks are
measured uncalibrated and one at a time: a ranking, not a forecast of the whole plan.

Prediction from far back in natural text is what breaks first as plans get faster (lambada), and neither term sees
it: the text KL is dominated by local prediction, the probe is synthetic. Where asked (`budget=...,long`), a third
term scores other windows of the training text only where the next token last occurred at least `LONG_RANGE`
tokens back (`long_range_labels`), and the chosen plan is measured whole (`joint_loss`) so that its worst member can
be swapped (`planners.swap_worst`). Where asked (`budget=...,read`), a term charges for reading from context on real
text: windows of the training text whose second half is spans of their first half copied at several distances
(`corpus.repeat_spans`), scored where the copy's next token is in the context — what a dropped attention or a
position-wise linear map cannot read, and a next-token KL on plain text hardly sees.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from echoatt.building.repair import teacher_stream
from echoatt.planning.plan import Change
from echoatt.training.losses import IGNORE_INDEX, hard_label_loss, soft_label_loss
from echoatt.training.precision import FP32, Precision

LONG_RANGE = 64  # a long-range prediction: the next token last occurred at least this many tokens back


def long_range_labels(windows: torch.Tensor, distance: int = LONG_RANGE) -> torch.Tensor:
    """`windows` (N, T) as labels where only the predictions of a token that last occurred at least `distance`
    tokens earlier in its window count: what a model can only get from far back (a name, a rare word), not from the
    last sentence (frequent tokens recur within it and are left out)."""
    labels = torch.full_like(windows, IGNORE_INDEX)
    for n, row in enumerate(windows.tolist()):
        last: dict[int, int] = {}
        for j, token in enumerate(row):
            if j - last.get(token, j) >= distance:
                labels[n, j] = token
            last[token] = j
    return labels


@dataclass
class BlockEffects:
    """Mean KL(teacher ‖ student) per token of each candidate change alone — a shared block, a dropped or linear
    attention, a narrowed FFN — on text, on the retrieval probe and, where measured, on long-range predictions."""

    teacher: dict[str, float]  # the teacher's own NLL there, for scale: {"text": ..., "retrieval": ...[, "long": ...]}
    blocks: dict[Change, dict[str, float]]  # candidate -> {"text": KL, "retrieval": KL[, "long": KL]}
    settings: dict

    def loss(self, block: Change) -> float:
        """The candidate's measured loss: the sum of its terms (with the long-range one where it was measured)."""
        return sum(self.blocks[block].values())

    def known(self, settings: dict) -> dict[Change, dict[str, float]]:
        """The blocks measured under exactly these settings (`commands.share.block_effect_settings`); none if they differ."""
        return self.blocks if self.settings == settings else {}

    def save(self, path: Path) -> None:
        blocks = {b.name: v for b, v in self.blocks.items()}
        path.write_text(json.dumps({"teacher": self.teacher, "blocks": blocks, "settings": self.settings}, indent=1))

    @classmethod
    def load(cls, path: Path) -> BlockEffects | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        def older(name: str) -> str:  # files written before `drop=N` named a dropped layer's candidate `N-N`
            a, dash, b = name.partition("-")
            return f"drop={a}" if dash and a == b else name

        return cls(data["teacher"], {Change.read(older(k)): v for k, v in data["blocks"].items()}, data["settings"])

    def summary(self, top: int = 6) -> str:
        ranked = sorted(self.blocks, key=self.loss)
        show = lambda bs: ", ".join(f"{b.name} {self.loss(b):+.3f}" for b in bs)
        terms = " + ".join(dict.fromkeys(k for v in self.blocks.values() for k in v)) or "nothing"
        return (f"measured loss of sharing each block alone (KL from the teacher: {terms}), over "
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


def _repeated_half(probe: torch.Tensor) -> torch.Tensor:
    """The probe (M, 2P) as labels where only the predictions of its repeated half count."""
    labels = probe.clone()
    labels[:, : probe.shape[1] // 2 + 1] = IGNORE_INDEX
    return labels


Inputs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # term -> (windows (N, T), labels (N, T): what counts)


def reading_labels(windows: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    """`windows` (N, T) as labels where only the predictions `reads` (N, T-1) marks count (`corpus.repeat_spans`'s:
    the tokens of a copy that the context holds)."""
    labels = torch.full_like(windows, IGNORE_INDEX)
    labels[:, 1:][reads] = windows[:, 1:][reads]
    return labels


def effect_inputs(text: torch.Tensor, probe: torch.Tensor, long: torch.Tensor | None = None,
                  reading: tuple[torch.Tensor, torch.Tensor] | None = None) -> Inputs:
    """What a candidate is scored on, by term: every prediction of `text`, the repeated half of the `probe` and,
    given `long` windows, their long-range predictions; given `reading` (windows of the training text with spans of
    it copied later, and which predictions read a copy: `corpus.repeat_spans`), those predictions."""
    inputs = {"text": (text, text), "retrieval": (probe, _repeated_half(probe))}
    inputs |= {"long": (long, long_range_labels(long))} if long is not None else {}
    return inputs | ({"reading": (reading[0], reading_labels(*reading))} if reading is not None else {})


def _kl(model: torch.nn.Module, inputs: Inputs, reference: dict, start: int = 0) -> dict[str, float]:
    """Mean KL(teacher ‖ model) per counted prediction of each term, the model run from decoder layer `start` on the
    teacher's hidden states there (`reference["hidden"]`)."""
    hidden = reference.get("hidden")
    feed = lambda name: {"start": start, "hidden": hidden[name][start]} if start else {}
    return {name: soft_label_loss(_logits(model, windows, **feed(name)), reference["logits"][name], labels).item()
            for name, (windows, labels) in inputs.items()}


def reference_of(teacher: torch.nn.Module, inputs: Inputs, hidden: bool = True) -> dict:
    """The teacher's logits on each term's windows, which candidates are compared with, and (with `hidden`) every
    decoder layer's input hidden states there, which a candidate runs from (a whole plan runs from its embeddings)."""
    reference = {"logits": {name: _logits(teacher, w) for name, (w, _) in inputs.items()}}
    return reference | ({"hidden": {name: _hidden_inputs(teacher, w) for name, (w, _) in inputs.items()}}
                        if hidden else {})


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
    fits: Callable | None = None, long: torch.Tensor | None = None,
    reading: tuple[torch.Tensor, torch.Tensor] | None = None, precision: Precision = FP32,
) -> BlockEffects:
    """Each candidate block shared alone by `spec` (a `student.StudentSpec`: method, head map) — a candidate of one
    layer: that layer's attention dropped; ("linear", L): its attention a linear map; ("ffn", L, W): its FFN at W
    channels — compared with the teacher on `text` (N, T) windows, the `probe` (M, 2P) and, given, the long-range
    predictions of `long` windows and the copies of `reading` (`effect_inputs`). `fits(student)` fits a linear map or a narrowed FFN in closed form
    (`calibrate.apply_fits`, from statistics on other text) before it is measured, as `share` will fit it;
    `repair(student)`, where given, repairs each candidate before it is measured (the planner then ranks blocks by
    what they cost once repaired). The forward passes run in `precision` (the fits and repairs in fp32)."""
    inputs = effect_inputs(text, probe, long, reading)
    device = next(teacher.parameters()).device
    with precision.autocast(device):
        reference = reference_of(teacher, inputs)
    base = {name: hard_label_loss(reference["logits"][name], labels).item()  # the teacher's own NLL, for scale
            for name, (_, labels) in inputs.items()}
    blocks = {}
    for block in tqdm(candidates, desc="measuring blocks", disable=not progress):
        alone = dataclasses.replace(spec, plan=block.name)  # shared as `spec` shares, dropped, or a fitted replacement
        student, _ = alone.build(teacher, similarity, share=repair is None)  # the teacher's tensors, unless trained
        if block.kind in ("linear", "ffn") and fits is not None:
            fits(student)
        if repair is not None:
            repair(student)
        with precision.autocast(device):
            blocks[block] = _kl(student, inputs, reference, block.first)
        del student
    return BlockEffects(base, blocks, settings)


def joint_loss(teacher: torch.nn.Module, spec, similarity, inputs: Inputs,
               fits: Callable | None = None, precision: Precision = FP32) -> Callable:
    """`loss(plan)`: a whole plan's measured loss — its student built by `spec` (fitted by `fits` where it replaces
    anything), compared with the teacher on every term of `inputs`, summed — for checking a plan chosen from
    candidates measured one at a time."""
    device = next(teacher.parameters()).device
    with precision.autocast(device):
        reference = reference_of(teacher, inputs, hidden=False)  # every plan runs whole, from its embeddings

    @torch.no_grad()
    def loss(plan) -> float:
        student, _ = dataclasses.replace(spec, plan=plan.spec()).build(teacher, similarity, share=True)
        if fits is not None and (plan.linear or plan.ffn):
            fits(student)
        with precision.autocast(device):
            return sum(_kl(student, inputs, reference).values())

    return loss
