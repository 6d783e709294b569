"""Which layers share attention: blocks of consecutive layers, the first (leader) computing, the rest following, and
layers whose attention is dropped — the plan as a value, with its text form (`spec`, `read`). The planners that choose
one are `planners.py`."""

from __future__ import annotations

from dataclasses import dataclass

from echoatt.common import closest

PLAN_WORDS = {  # what each kind of plan string takes after its first part
    "k": ("first", "last", "followers", "protect"),
    "threshold": ("max", "protect"),
    "budget": ("k", "prefill", "decode", "kv", "protect", "max", "drop", "drop-only"),
}
# Budget targets: bounds to reach (at least) or ratios to stay under (at most), as `student.plan_bounds` gives them.
AT_LEAST, AT_MOST = ("prefill", "decode"), ("kv",)


class PlanError(ValueError):
    """A sharing plan that cannot be built, saying why."""


UNREACHABLE = ("the budget cannot be met even with every unprotected layer following or dropped: relax it (a "
               "lower target, or budget=k=2,drop: at least blind k=2's speed, which every model reaches)")


@dataclass(frozen=True)
class SharingPlan:
    """Blocks of consecutive layer indices; `blocks[b][0]` leads, the others follow it. A mixed plan also removes
    the attention of some other layers outright (`dropped`).

    Attributes:
        num_layers: layers in the model the plan is for.
        blocks: each block's layers, ascending and consecutive, at least two per block.
        dropped: layers, in no block, whose attention sub-layer the student leaves out.
    """

    num_layers: int
    blocks: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        seen: set[int] = set(self.dropped)
        if any(not 0 <= i < self.num_layers for i in self.dropped) or len(seen) != len(self.dropped):
            raise PlanError(f"dropped layers {list(self.dropped)} must be distinct layers of the model")
        for block in self.blocks:
            if len(block) < 2:
                raise PlanError(f"block {list(block)} has one layer: a block needs a leader and at least one follower")
            if list(block) != list(range(block[0], block[0] + len(block))):
                raise PlanError(f"block {list(block)} is not consecutive ascending layers")
            if block[0] < 0 or block[-1] >= self.num_layers:
                raise PlanError(f"block {list(block)} is out of range for a {self.num_layers}-layer model")
            if seen & set(block):
                raise PlanError(f"block {list(block)} overlaps another block")
            seen |= set(block)

    @property
    def followers(self) -> list[int]:
        return [layer for block in self.blocks for layer in block[1:]]

    @property
    def leaders(self) -> list[int]:
        return [block[0] for block in self.blocks]

    def attention_source(self) -> list[int]:
        """For each layer, the layer whose attention it uses (itself unless it follows)."""
        source = list(range(self.num_layers))
        for block in self.blocks:
            for layer in block[1:]:
                source[layer] = block[0]
        return source

    def describe(self) -> str:
        blocks = " ".join(f"[{b[0]}<-{','.join(map(str, b[1:]))}]" for b in self.blocks) or "(no sharing)"
        dropped = f"; attention dropped at {list(self.dropped)}" if self.dropped else ""
        return f"{len(self.followers)}/{self.num_layers} layers follow: {blocks}{dropped}"


    @classmethod
    def read(cls, spec: str, num_layers: int) -> SharingPlan:
        """The plan `spec()` writes, read back: explicit blocks `1-2,4-6`, layers whose attention is dropped
        `drop=7`, or `none`."""
        spec = spec.strip()
        if spec in ("none", ""):
            return cls(num_layers, ())
        parts = [p.strip() for p in spec.split(",")]
        blocks, dropped = [], []
        for part in parts:
            try:
                if part.startswith("drop="):
                    dropped.append(int(part.removeprefix("drop=")))
                    continue
                a, b = (int(x) for x in part.split("-"))
            except ValueError as err:
                near = closest(part.split("=")[0], [*PLAN_WORDS, "none", "drop"])
                raise PlanError(f"cannot parse {part!r} in plan {spec!r}{near}: use k=N, threshold=X, budget=..., none, "
                                "or blocks like 1-2,4-6 (with drop=N for a layer whose attention is dropped)") from err
            if b < a:
                raise PlanError(f"block {part!r} must run from a lower to a higher layer (like {b}-{a})")
            blocks.append(tuple(range(a, b + 1)))
        return cls(num_layers, tuple(blocks), tuple(dropped))

    def spec(self) -> str:
        """The plan as an explicit plan string that `parse` reads back to this plan: `27-28,drop=6,drop=25`."""
        parts = [f"{b[0]}-{b[-1]}" for b in self.blocks] + [f"drop={i}" for i in self.dropped]
        return ",".join(parts) or "none"


