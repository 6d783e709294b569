"""The planners that choose a `SharingPlan`: every k layers, by a similarity threshold, by a speed budget at the least
measured (or predicted) loss, or by attention drop's own ranking; and `parse`, which reads any plan string."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MappingProxyType

import numpy as np

from echoatt.planning.plan import AT_LEAST, AT_MOST, PLAN_WORDS, UNREACHABLE, Change, PlanError, SharingPlan


def from_k(
    num_layers: int,
    k: int,
    share_first: bool = False,
    share_last: bool = False,
    followers: int | None = None,
    protect_first: int = 1,
) -> SharingPlan:
    """Every k consecutive layers form a block, over the inner layers unless asked; a leftover single stays.
    `followers` keeps only the first blocks, up to that many followers (the papers' "9 of 22"). The first
    `protect_first` layers never share (LiSA found shallow layers fragile); `share_first` sets it to 0."""
    if k < 2:
        raise PlanError(f"k must be at least 2 (got {k})")
    start, stop = (0 if share_first else protect_first), (num_layers if share_last else num_layers - 1)
    blocks = [tuple(range(i, min(i + k, stop))) for i in range(start, stop, k)]
    blocks = [b for b in blocks if len(b) >= 2]
    if followers is not None:
        kept, count = [], 0
        for b in blocks:
            take = min(len(b) - 1, followers - count)
            if take > 0:
                kept.append(b[: take + 1])
                count += take
        blocks = kept
    return SharingPlan(num_layers, tuple(blocks))


def from_threshold(
    head_matched: np.ndarray,
    threshold: float,
    max_block: int | None = None,
    protect_first: int = 1,
    protect_last: int = 1,
    adjacent: bool = False,
) -> SharingPlan:
    """Greedy blocks over the unprotected layers: a layer joins the current block while its head-matched
    similarity to the block's leader (with `adjacent`, to the layer before it, whose attention a LiSA follower
    reads) is at least `threshold` (and the block is below `max_block`)."""
    num_layers = head_matched.shape[0]
    blocks, layer = [], protect_first
    while layer < num_layers - protect_last:
        block = [layer]
        nxt = layer + 1
        while (
            nxt < num_layers - protect_last
            and head_matched[nxt, nxt - 1 if adjacent else layer] >= threshold
            and (max_block is None or len(block) < max_block)
        ):
            block.append(nxt)
            nxt += 1
        if len(block) > 1:
            blocks.append(tuple(block))
        layer = nxt
    return SharingPlan(num_layers, tuple(blocks))


def dropping(candidates: list[Change]) -> list[Change]:
    """Attention drop's changes: each layer that one of `candidates` leaves without attention of its own, dropped."""
    return [Change("drop", (i,)) for i in sorted({i for c in candidates for i in c.attention_removed})]


def from_ranking(num_layers: int, ranked: list[int], meets: Callable[[SharingPlan], bool]) -> SharingPlan:
    """The attention of the first layers of `ranked` that meet a budget, dropped (attention drop's own order)."""
    for n in range(len(ranked) + 1):
        plan = SharingPlan.of([Change("drop", (i,)) for i in ranked[:n]], num_layers)
        if meets(plan):
            return plan
    raise PlanError(UNREACHABLE)


Candidate = Change  # the budget planner chooses among changes (plan.py)


def from_budget(
    num_layers: int,
    candidates: list[Candidate],
    block_loss: Callable[[Candidate], float],
    meets: Callable[[SharingPlan], bool],
    progress: Callable[[SharingPlan], float],
    chosen: list[Candidate] = (),
) -> SharingPlan:
    """The changes that meet a budget with the least predicted loss, greedily: from no change (or `chosen`), take the
    candidate — a block, a larger block replacing chosen ones inside it, (a candidate of one layer) that layer's
    attention dropped, its attention replaced by a linear map, or its FFN narrowed (a narrower one replacing a wider) —
    that buys the most `progress` towards the targets per unit of loss, until `meets(plan)`. A move that lowers the
    loss (a larger block measured cheaper than the ones it replaces) and makes progress ranks before any other, the
    largest improvement first: per unit of progress, a smaller gain would look better."""
    chosen = list(chosen)
    plan = SharingPlan.of(chosen, num_layers)
    while not meets(plan):
        best, now = None, progress(plan)
        for block in candidates:
            if block in chosen:
                continue
            inside = [b for b in chosen if block.overlaps(b)]
            if inside and not all(block.replaces(b) for b in inside):
                continue
            option = SharingPlan.of([b for b in chosen if b not in inside] + [block], num_layers)
            gain = progress(option) - now
            if gain <= 1e-12:
                continue
            delta = block_loss(block) - sum(block_loss(b) for b in inside)
            rank = (0, delta) if delta < 0 else (1, delta / gain)  # improvements first, by how much they improve
            if best is None or rank < best[0]:
                best = (rank, block, inside)
        if best is None:
            raise PlanError(UNREACHABLE)
        chosen = sorted([b for b in chosen if b not in best[2]] + [best[1]], key=str)
        plan = SharingPlan.of(chosen, num_layers)
    return plan


def swap_worst(
    plan: SharingPlan,
    candidates: list[Candidate],
    block_loss: Callable[[Candidate], float],
    meets: Callable[[SharingPlan], bool],
    progress: Callable[[SharingPlan], float],
    joint: Callable[[SharingPlan], float],
    rounds: int = 2,
    say: Callable[[str], None] = lambda _: None,
) -> SharingPlan:
    """A budget plan checked whole: its worst member — the one whose removal lowers the plan's `joint` (measured)
    loss most — is left out and the budget met again from the rest without it (`from_budget`), kept only where the
    whole plan then measures lower; up to `rounds` times. Candidates measured alone miss what changes do together
    (two layers that each keep some of a long-range circuit)."""
    best, left_out = joint(plan), set()
    for _ in range(rounds):
        members = sorted(plan.changes(), key=str)
        if not members:
            break
        without = {m: joint(SharingPlan.of([c for c in members if c != m], plan.num_layers)) for m in members}
        worst = min(without, key=without.get)  # the lowest loss without it: the most costly member
        left_out.add(worst)
        try:
            option = from_budget(plan.num_layers, [c for c in candidates if c not in left_out], block_loss, meets,
                                 progress, [c for c in members if c != worst])
        except PlanError:  # nothing else reaches the budget
            break
        value = joint(option)
        kept = value < best
        say(f"whole-plan check: {plan.spec()} measures {best:.3f}; without its worst member ({worst}), met again: "
            f"{option.spec()} measures {value:.3f} — {'taken' if kept else 'the first kept'}")
        if not kept:
            break
        plan, best = option, value
    return plan


SYNTAX_WIDTH = 1024  # an FFN width a plan's syntax is checked with before the teacher's is known
FFN_FRACTIONS = (0.75, 0.5, 0.25, 0.0)  # `budget=...,ffn`: the widths each FFN may take, of the teacher's


def ffn_widths(intermediate: int, multiple: int = 64) -> list[int]:
    """The FFN widths a budget plan weighs: `FFN_FRACTIONS` of the teacher's, rounded to `multiple` channels (kernels,
    tensor-parallel splits and q8_0's 32-value blocks take such widths), 0 (no FFN) last."""
    widths = [max(multiple, round(intermediate * f / multiple) * multiple) if f else 0 for f in FFN_FRACTIONS]
    return list(dict.fromkeys(w for w in widths if w < intermediate))


def parse(
    spec: str,
    num_layers: int,
    head_matched: np.ndarray | None = None,
    adjacent: bool = False,
    bounds: Callable[[SharingPlan], dict[str, float]] | None = None,
    check_only: bool = False,
    block_loss: Callable[[Candidate], float] | None = None,
    ranking: list[int] | None = None,
    intermediate: int | None = None,
    joint: Callable[[SharingPlan], float] | None = None,
) -> SharingPlan:
    """Parse a plan string: `k=2`, `k=3,first,last`, `k=2,followers=9`, `k=2,protect=4`,
    `threshold=0.9[,max=3][,protect=4]`, `budget=k=2` (at least plan k=2's prefill and decode bounds) or
    `budget=decode=1.2[,prefill=1.08][,kv=0.7][,protect=N][,max=3][,drop][,linear][,ffn][,long][,read]`, `none`, or blocks
    `1-2,4-6` with dropped attention `drop=N`, linear attention `linear=N` and FFN widths `ffn=N:W`. `adjacent`:
    threshold and budget plans compare each layer with the one before it (LiSA) rather than with its block's
    leader. `bounds` costs a plan for a budget, `block_loss` (measured) predicts what a block costs in quality
    (default: from the similarity), or `ranking` orders the layers to take (attention drop's criterion);
    `check_only` checks the syntax without searching; `intermediate` (the teacher's FFN width) prices FFN candidates;
    `joint` measures a whole plan, for a `long` budget's `swap_worst`."""
    spec = spec.strip()
    parts = [p.strip() for p in spec.split(",")]
    opts = dict(p.split("=", 1) for p in parts if "=" in p)
    kind = parts[0].split("=", 1)[0]
    if kind in PLAN_WORDS and kind != "budget":  # a budget's options are checked where they are read
        unknown = [p for p in parts[1:] if p.split("=", 1)[0] not in PLAN_WORDS[kind]]
        if unknown:
            raise PlanError(f"unknown option {unknown[0]!r} in plan {spec!r}; a {kind}= plan takes "
                            f"{', '.join(PLAN_WORDS[kind])}")
    try:
        protect = int(opts.get("protect", 1))
        if kind == "budget":
            return _budget(spec, num_layers, head_matched, adjacent, bounds, check_only, block_loss, ranking,
                           intermediate, joint)
        if kind == "k":
            k = int(opts["k"])
            first, last = "first" in parts[1:], "last" in parts[1:]
            shareable = num_layers - (0 if first else protect) - (0 if last else 1)
            if k > max(shareable, 1):
                raise PlanError(f"k={k} is larger than the {max(shareable, 0)} layers this {num_layers}-layer "
                                "model can share here; use a smaller k")
            followers = int(opts["followers"]) if "followers" in opts else None
            return from_k(num_layers, k, first, last, followers, protect)
        if kind == "threshold":
            if head_matched is None:
                raise PlanError("a threshold plan needs the similarity analysis (run `echoatt analyze` first)")
            max_block = int(opts["max"]) if "max" in opts else None
            return from_threshold(head_matched, float(opts["threshold"]), max_block, protect, adjacent=adjacent)
    except PlanError:
        raise
    except ValueError as err:
        raise PlanError(f"bad number in plan {spec!r}") from err
    return SharingPlan.read(spec, num_layers)


@functools.cache
def budget_options(spec: str) -> dict[str, str]:
    """The options of a `budget=` plan string, refusing unknown ones and a budget without a target."""
    parts = spec.split(",")
    opts = {}
    for item in [parts[0].split("=", 1)[1], *parts[1:]]:
        key, _, value = item.strip().partition("=")
        if key not in PLAN_WORDS["budget"]:
            raise PlanError(f"unknown option {key!r} in plan {spec!r}; a budget= plan takes "
                            f"{', '.join(PLAN_WORDS['budget'])}")
        opts[key] = value
    if "drop-only" in opts:  # a servable plan for engines without shared attention (llama.cpp, DeciLM)
        opts["drop"] = ""
    if not set(opts) & {"k", *AT_LEAST, *AT_MOST}:
        raise PlanError(f"plan {spec!r} names no target: use budget=k=2 or e.g. budget=decode=1.2,prefill=1.05")
    return MappingProxyType(opts)  # cached: read-only


def budget_candidates(spec: str, num_layers: int, intermediate: int | None = None) -> list[Candidate]:
    """The changes a `budget=` plan chooses among: blocks of 2 to `max` (default 3) consecutive layers, none of the
    first `protect` (default 1) nor the last layer; with `drop`, also each follower-able layer alone (its attention
    dropped); with `drop-only`, only those and no blocks (a plan that every engine can run: no layer reads another's
    attention); with `linear`, each such layer's attention replaced by a fitted linear map; with `ffn`, each
    unprotected layer's FFN at the `ffn_widths` of the teacher's `intermediate` size. (`long` and `read` change how
    they are measured, not which they are.)"""
    opts = budget_options(spec)
    max_block, protect = int(opts.get("max", 3)), int(opts.get("protect", 1))
    layers = range(protect, num_layers - 1)
    blocks = [Change.block(range(a, a + n)) for n in range(2, max_block + 1) for a in layers if a + n - 1 in layers]
    out = [] if "drop-only" in opts else blocks
    out += [Change("drop", (i,)) for i in layers[1:]] if "drop" in opts else []
    out += [Change("linear", (i,)) for i in layers[1:]] if "linear" in opts else []
    if "ffn" in opts:
        if intermediate is None:
            raise PlanError(f"plan {spec!r} weighs FFN widths, which needs the teacher's intermediate size")
        out += [Change("ffn", (i,), w) for i in layers for w in ffn_widths(intermediate)]
    return out


def densest(spec: str, num_layers: int, intermediate: int | None = None, drop: bool = False) -> list[SharingPlan]:
    """The densest plans a budget's candidates build, about the most it can reach: one per kind of attention change
    it may take (blocks, the largest first; dropped; linear), as many of it as fit, each with every FFN it may narrow
    at its narrowest. `drop`: attention drop's (`dropping`), as its ranking takes them."""
    candidates = budget_candidates(spec, num_layers, intermediate)
    if drop:
        candidates = dropping(candidates) + [c for c in candidates if c.kind == "ffn"]
    chosen: dict[str, list[Change]] = {}
    for change in sorted(candidates, key=lambda c: (-len(c.layers), c.width or 0, c.layers)):  # narrowest FFN first
        kept = chosen.setdefault(change.kind, [])
        if not any(change.overlaps(c) for c in kept):
            kept.append(change)
    ffn = chosen.pop("ffn", [])
    return [SharingPlan.of(kept + ffn, num_layers) for kept in chosen.values()] or [SharingPlan.of(ffn, num_layers)]


def _budget(spec, num_layers, head_matched, adjacent, bounds, check_only, block_loss, ranking,
            intermediate, joint) -> SharingPlan:
    opts = budget_options(spec)
    candidates = budget_candidates(spec, num_layers, intermediate or (SYNTAX_WIDTH if check_only else None))
    if check_only:
        return SharingPlan(num_layers, ())
    if bounds is None or (head_matched is None and block_loss is None and ranking is None):
        raise PlanError("a budget plan needs the similarity analysis (run `echoatt analyze` first)")
    targets = {k: float(v) for k, v in opts.items() if k in AT_LEAST + AT_MOST}
    if "k" in opts:  # at least what blind k=N reaches, unless a target says otherwise
        reference = bounds(from_k(num_layers, int(opts["k"])))
        targets = {k: reference[k] for k in AT_LEAST} | targets

    def meets(plan: SharingPlan) -> bool:
        got = bounds(plan)
        return all(got[k] >= v - 1e-9 if k in AT_LEAST else got[k] <= v + 1e-9 for k, v in targets.items())

    # Progress counts only the targets that sharing reaches by going faster (a bound above 1, a KV ratio below 1),
    # each as a share of the way from no sharing, in [0, 1]: a target the empty plan meets already (blind k=2
    # LiSA's prefill bound is below 1) is kept by `meets`, never rewarded for being slowed towards.
    ahead = {k: v for k, v in targets.items() if (v > 1 if k in AT_LEAST else v < 1)}

    def progress(plan: SharingPlan) -> float:
        got = bounds(plan)
        return sum(min(max((got[k] - 1) / (v - 1) if k in AT_LEAST else (1 - got[k]) / (1 - v), 0.0), 1.0)
                   for k, v in ahead.items())

    if ranking is not None:  # attention drop, in its own order
        droppable = {change.first for change in dropping(candidates)}
        return from_ranking(num_layers, [i for i in ranking if i in droppable], meets)
    if set(opts) & {"drop", "linear", "ffn"} and block_loss is None:
        raise PlanError(f"plan {spec!r} weighs dropping or replacing attention, or narrowing FFNs, against sharing "
                        "attention, which needs the measured loss of each (a teacher with a tokenizer)")
    loss = block_loss or similarity_loss(head_matched, adjacent)
    plan = from_budget(num_layers, candidates, loss, meets, progress)
    if "long" in opts:
        if joint is None or block_loss is None:
            raise PlanError(f"plan {spec!r} measures long-range prediction and checks the plan whole, which needs "
                            "the teacher and its tokenizer")
        plan = swap_worst(plan, candidates, loss, meets, progress, joint, say=print)
    return plan


def similarity_loss(head_matched: np.ndarray, adjacent: bool = False) -> Callable[[Change], float]:
    """A block's loss as the analysis predicts it: Σ over its followers of 1 − head-matched similarity to the layer
    each reads (the leader, or with `adjacent` the layer before it)."""
    return lambda block: float(sum(1 - head_matched[i, i - 1 if adjacent else block.first] for i in block.followers))
