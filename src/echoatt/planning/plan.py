"""What the student changes, layer by layer: blocks of consecutive layers sharing attention (the first, the leader,
computing; the rest following), layers whose attention is dropped or replaced by a fitted linear map, and FFNs made
narrower or dropped — the plan as a value, with its text form (`spec`, `read`). The planners that choose one are
`planners.py`."""

from __future__ import annotations

from dataclasses import dataclass

from echoatt.common import closest

DEFAULT_PLAN = "budget=decode=1.15,drop"  # the fastest plan of the default teacher's trade curve that keeps its quality
SERVABLE_PLAN = DEFAULT_PLAN.replace(",drop", ",drop-only")  # the same budget, dropped attention alone: any engine runs it
PLAN_WORDS = {  # what each kind of plan string takes after its first part
    "k": ("first", "last", "followers", "protect"),
    "threshold": ("max", "protect"),
    "budget": ("k", "prefill", "decode", "kv", "protect", "max", "drop", "drop-only", "linear", "ffn",
               "long", "read"),
}
CHANGE_WORDS = ("drop", "linear", "ffn")  # an explicit plan's per-layer changes besides blocks
# Budget targets: bounds to reach (at least) or ratios to stay under (at most), as `student.plan_bounds` gives them.
AT_LEAST, AT_MOST = ("prefill", "decode"), ("kv",)


class PlanError(ValueError):
    """A sharing plan that cannot be built, saying why."""


UNREACHABLE = ("the budget cannot be met even with every unprotected layer following or dropped: relax it (a "
               "lower target, or budget=k=2,drop: at least blind k=2's speed, which every model reaches)")


CHANGE_KINDS = ("share", "drop", "linear", "ffn")


@dataclass(frozen=True)
class Change:
    """One change a plan makes, the unit the budget planner chooses among and measures: `share` (a block of
    consecutive layers, the first leading, the others following it), `drop` (one layer's attention left out), `linear`
    (one layer's attention replaced by a fitted linear map) or `ffn` (one layer's FFN at `width` channels, 0: none).
    Its `name` is its entry in the plan syntax (`4-6`, `drop=7`, `linear=7`, `ffn=7:768`); `read` reads it back."""

    kind: str
    layers: tuple[int, ...]
    width: int | None = None  # `ffn` only

    def __post_init__(self) -> None:
        if self.kind not in CHANGE_KINDS:
            raise PlanError(f"a change is one of {', '.join(CHANGE_KINDS)} (got {self.kind!r})")
        if (len(self.layers) < 2) if self.kind == "share" else len(self.layers) != 1:
            raise PlanError(f"a {self.kind} change takes {'two or more layers' if self.kind == 'share' else 'one layer'}"
                            f" (got {list(self.layers)})")
        if (self.width is None) != (self.kind != "ffn"):
            raise PlanError(f"only an ffn change has a width (got {self.kind} with {self.width})")

    @classmethod
    def block(cls, layers: tuple[int, ...] | list[int]) -> Change:
        return cls("share", tuple(layers))

    @property
    def first(self) -> int:
        """The lowest layer the change touches: below it the student is the teacher."""
        return self.layers[0]

    @property
    def followers(self) -> tuple[int, ...]:
        """The layers that follow a leader under this change (a block's all but its first)."""
        return self.layers[1:] if self.kind == "share" else ()

    @property
    def attention_removed(self) -> tuple[int, ...]:
        """The layers left without attention of their own: a block's followers, a dropped or linear layer."""
        return self.followers if self.kind == "share" else () if self.kind == "ffn" else self.layers

    @property
    def attention_layers(self) -> frozenset[int]:
        """The layers whose attention the change touches (a block's leader too; none for an FFN)."""
        return frozenset() if self.kind == "ffn" else frozenset(self.layers)

    def overlaps(self, other: Change) -> bool:
        """Both change the same layer's attention, or the same layer's FFN."""
        same_ffn = self.kind == other.kind == "ffn" and self.layers == other.layers
        return bool(self.attention_layers & other.attention_layers) or same_ffn

    def replaces(self, chosen: Change) -> bool:
        """Whether this change may replace an overlapping `chosen` one: a larger block the blocks inside it, a
        narrower FFN a wider one of its layer, a dropped attention a linear one (both save the cache; the drop more)."""
        if self.kind == "ffn":
            return chosen.kind == "ffn" and chosen.layers == self.layers and chosen.width > self.width
        if self.kind == "share":
            return chosen.kind == "share" and set(chosen.layers) <= set(self.layers)
        return self.kind == "drop" and chosen.kind == "linear"

    @property
    def name(self) -> str:
        first, last = self.layers[0], self.layers[-1]
        return {"share": f"{first}-{last}", "drop": f"drop={first}", "linear": f"linear={first}",
                "ffn": f"ffn={first}:{self.width}"}[self.kind]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def read(cls, name: str) -> Change:
        """`name` read back; PlanError for anything else."""
        word, _, value = name.strip().partition("=")
        try:
            if word in ("drop", "linear"):
                return cls(word, (int(value),))
            if word == "ffn":
                layer, width = value.split(":")
                return cls("ffn", (int(layer),), int(width))
            a, b = (int(x) for x in name.split("-"))
        except ValueError as err:
            raise PlanError(f"cannot read the change {name!r}") from err
        if b <= a:
            raise PlanError(f"block {name!r} has one layer: a block needs a leader and at least one follower" if a == b
                            else f"block {name!r} must run from a lower to a higher layer (like {b}-{a})")
        return cls("share", tuple(range(a, b + 1)))


@dataclass(frozen=True)
class SharingPlan:
    """Blocks of consecutive layer indices; `blocks[b][0]` leads, the others follow it. A mixed plan also removes
    the attention of some other layers outright (`dropped`) or replaces it by a linear map of the layer's normed input
    (`linear`), and narrows or drops some layers' FFNs (`ffn`) — Puzzle's per-layer choices (arXiv 2411.19146).

    Attributes:
        num_layers: layers in the model the plan is for.
        blocks: each block's layers, ascending and consecutive, at least two per block.
        dropped: layers, in no block, whose attention sub-layer the student leaves out.
        linear: layers, in no block and not dropped, whose attention is one fitted (C x C) matrix instead.
        ffn: (layer, intermediate width) pairs, ascending by layer: that layer's FFN keeps `width` channels (0: none).
    """

    num_layers: int
    blocks: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...] = ()
    linear: tuple[int, ...] = ()
    ffn: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("dropped", "linear"):
            layers = getattr(self, name)
            if any(not 0 <= i < self.num_layers for i in layers) or len(set(layers)) != len(layers):
                raise PlanError(f"{name} layers {list(layers)} must be distinct layers of the model")
        if set(self.dropped) & set(self.linear):
            raise PlanError(f"layers {sorted(set(self.dropped) & set(self.linear))} cannot both drop their attention "
                            "and replace it by a linear map")
        seen: set[int] = set(self.dropped) | set(self.linear)
        ffn_layers = [layer for layer, _ in self.ffn]
        if len(set(ffn_layers)) != len(ffn_layers) or any(not 0 <= i < self.num_layers for i in ffn_layers):
            raise PlanError(f"ffn entries {self.ffn_spec()} must name distinct layers of the model, one width each")
        if any(width < 0 for _, width in self.ffn):
            raise PlanError(f"ffn widths {self.ffn_spec()} must be 0 (no FFN) or more channels")
        object.__setattr__(self, "ffn", tuple(sorted(self.ffn)))  # one order, so equal plans compare equal
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
        linear = f"; attention linear at {list(self.linear)}" if self.linear else ""
        ffn = f"; FFN {self.ffn_spec()}" if self.ffn else ""
        return f"{len(self.followers)}/{self.num_layers} layers follow: {blocks}{dropped}{linear}{ffn}"

    def ffn_spec(self) -> str:
        """The FFN changes as `ffn=L:W` entries (W = 0: dropped)."""
        return ",".join(f"ffn={layer}:{width}" for layer, width in self.ffn)

    def ffn_width(self, layer: int, full: int) -> int:
        """Layer `layer`'s FFN width under this plan (`full`: the teacher's)."""
        return dict(self.ffn).get(layer, full)

    def dropping_followers(self) -> SharingPlan:
        """The plan with each follower's attention dropped rather than shared (attention drop, `--method drop`):
        whom a layer follows does not matter once it reads nothing."""
        changes = [Change("drop", (i,)) for i in self.followers] + [c for c in self.changes() if c.kind != "share"]
        return SharingPlan.of(changes, self.num_layers)

    def changes(self) -> list[Change]:
        """The changes the plan is made of, in the order `spec` writes them."""
        return ([Change.block(b) for b in self.blocks] + [Change("drop", (i,)) for i in self.dropped]
                + [Change("linear", (i,)) for i in self.linear] + [Change("ffn", (i,), w) for i, w in self.ffn])

    @classmethod
    def of(cls, changes: list[Change], num_layers: int) -> SharingPlan:
        """The plan made of `changes` (the planner's chosen candidates)."""
        kind = lambda k: [c for c in changes if c.kind == k]
        return cls(num_layers, tuple(sorted(c.layers for c in kind("share"))),
                   tuple(sorted(c.first for c in kind("drop"))), tuple(sorted(c.first for c in kind("linear"))),
                   tuple(sorted((c.first, c.width) for c in kind("ffn"))))

    @classmethod
    def read(cls, spec: str, num_layers: int) -> SharingPlan:
        """The plan `spec()` writes, read back: explicit blocks `1-2,4-6`, layers whose attention is dropped
        `drop=7` or replaced by a linear map `linear=12`, FFN widths `ffn=5:768` (`ffn=20:0`: no FFN), or `none`."""
        spec = spec.strip()
        if spec in ("none", ""):
            return cls(num_layers, ())
        changes = []
        for part in (p.strip() for p in spec.split(",")):
            try:
                changes.append(Change.read(part))
            except PlanError as err:
                if not str(err).startswith("cannot read"):  # read, but not a change a plan can make
                    raise
                near = closest(part.split("=")[0], [*PLAN_WORDS, "none", *CHANGE_WORDS])
                raise PlanError(f"cannot parse {part!r} in plan {spec!r}{near}: use k=N, threshold=X, budget=..., none, "
                                "or blocks like 1-2,4-6 (with drop=N for a layer whose attention is dropped, linear=N "
                                "for one replaced by a linear map, ffn=N:W for an FFN of W channels, 0: none)") from err
        kind = lambda k: [c for c in changes if c.kind == k]  # in the order written: duplicates are refused, not merged
        return cls(num_layers, tuple(c.layers for c in kind("share")), tuple(c.first for c in kind("drop")),
                   tuple(c.first for c in kind("linear")), tuple(sorted((c.first, c.width) for c in kind("ffn"))))

    def spec(self) -> str:
        """The plan as an explicit plan string that `parse` reads back to this plan:
        `27-28,drop=6,drop=25,linear=12,ffn=5:768`."""
        return ",".join(c.name for c in self.changes()) or "none"


