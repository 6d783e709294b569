"""A run's results as tables and files keep them: the rows perplexity is reported under (held-out text, the other
text, each one's key tokens), the run's headline summary, zero-shot arithmetic (the mean, and the gap to the teacher
paired item by item), the trade curve, and the short timing a run takes. No torch: `report` reads them without it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from echoatt.planning.plan import AT_MOST

if TYPE_CHECKING:
    from echoatt.run.rundir import RunDir


# Results are keyed by what a model is, never by how it is shown; these are the labels tables show.
OTHER_ROW = "other text"  # the results row of perplexity on --other-text: "other text (SOURCE)"


def other_row(source: str) -> str:
    return f"{OTHER_ROW} ({Path(source).name})"


HELD_OUT_ROW = "held-out text"  # the results row of perplexity on the corpus' validation split


KEY_ROW = ": key tokens"  # a text's row of key-token perplexity (`key_tokens.py`): "held-out text: key tokens"


def key_row(row: str) -> str:
    return row + KEY_ROW


def point_perplexities(scores: dict[str, dict]) -> dict[str, float]:
    """One model's perplexities as a trade-curve point keeps them, from its results rows: `perplexity` (held-out
    text), `other_perplexity` (the other text) and each one's key-token twin (`key_perplexity`,
    `other_key_perplexity`), where scored."""
    other = next((k for k in scores if k.startswith(OTHER_ROW) and not k.endswith(KEY_ROW)), None)
    rows = {"perplexity": HELD_OUT_ROW, "key_perplexity": key_row(HELD_OUT_ROW), "other_perplexity": other,
            "other_key_perplexity": other and key_row(other)}
    return {name: scores[row]["perplexity"] for name, row in rows.items() if row in scores}


QUICK_SPEED = {"prefill": "512", "decode": "8x256", "train_len": 0, "repeats": 3}  # what `run` times: a short look


def quick_speed_settings(device: str) -> dict:
    """`QUICK_SPEED` on `device`. On CUDA decode runs from a static cache with compiled steps (CUDA graphs): eager
    steps there time kernel launches, and a dynamic cache copies every layer's K and V each step (`torch.cat`), bytes
    neither the bound nor the bandwidth limit counts — ratios of those would read as model speed. The bench table's
    setting column says which was used."""
    cuda = {"decode_cache": "static", "compile": True} if device.startswith("cuda") else {}
    return QUICK_SPEED | cuda


MODEL_LABELS = {"teacher": "teacher", "student": "student (before KD)", "distilled": "student (after KD)"}


@dataclass
class RunSummary:
    """The main job's headline: held-out perplexity of teacher and student before and after distillation, and where
    scored on the other text and on each text's key tokens (what needs the far context)."""

    validation_windows: int
    seq_len: int
    perplexity: dict[str, float]  # teacher, student_before_kd, student_after_kd
    gap_closed_percent: float | None
    other_text: dict | None = None  # {"text": its results row, "perplexity": keyed as `perplexity`}, where scored
    # by text row: {"percent": the share of far-context predictions that are key, "near": the near context's tokens, "gain": nats,
    # "perplexity": keyed as `perplexity`}
    key_tokens: dict | None = None
    training: dict | None = None  # the distillation's precision and speed (`distill`'s summary "training" entry)

    @classmethod
    def of(cls, results: dict[str, dict], windows: int, seq_len: int) -> RunSummary:
        """From `evaluate`'s results keyed like MODEL_LABELS (teacher, student, distilled)."""
        keys = {"teacher": "teacher", "student": "student_before_kd", "distilled": "student_after_kd"}
        ppl = {keys[name]: r[HELD_OUT_ROW]["perplexity"] for name, r in results.items()}
        t, before, after = ppl["teacher"], ppl["student_before_kd"], ppl["student_after_kd"]
        gap = 100.0 * (before - after) / (before - t) if before > t else None
        row = next((k for k in results["teacher"] if k.startswith(OTHER_ROW) and not k.endswith(KEY_ROW)), None)
        other = row and {"text": row, "perplexity": {keys[n]: r[row]["perplexity"] for n, r in results.items()}}
        key = {text: {k: results["teacher"][key_row(text)][k] for k in ("percent", "near", "gain")}
                     | {"perplexity": {keys[n]: r[key_row(text)]["perplexity"] for n, r in results.items()}}
               for text in (HELD_OUT_ROW, row) if text and key_row(text) in results["teacher"]}
        return cls(windows, seq_len, ppl, gap, other, key or None)

    def key_lines(self) -> list[str]:
        """Key-token perplexity in words, a line per text: what needs the far context, before and after distillation."""
        out = []
        for text, k in (self.key_tokens or {}).items():
            q = k["perplexity"]
            out.append(f"{text.removesuffix(')').replace(' (', ': ')}, key tokens ({k['percent']:.1f}% of the "
                       f"predictions with far context; the teacher gains >= {k['gain']:g} nats on them from more than "
                       f"the last {k['near']} tokens): teacher {q['teacher']:.2f}, student before KD "
                       f"{q['student_before_kd']:.2f}, after KD {q['student_after_kd']:.2f} "
                       f"({q['student_after_kd'] / q['teacher']:.2f}x the teacher's)")
        return out

    def save(self, run: RunDir) -> None:
        run.summary.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run: RunDir) -> RunSummary | None:
        return cls(**json.loads(run.summary.read_text())) if run.summary.is_file() else None


def training_line(training: dict) -> str:
    """A distillation's precision and speed in words (`distill`'s summary "training" entry)."""
    p, speed, share = training["precision"], training.get("tokens_per_s"), training.get("matmul_share")
    line = f"trained in {p['name']} ({p['why']})"
    line += f", a median {speed:.0f} tokens/s" if speed else ""
    return line + (f"; matmuls took {share:.0%} of a profiled step's time" if share is not None else "")


def headline_metric(entry: dict) -> str:
    """The accuracy a task is judged by: acc_norm where lm-eval reports it (length-normalised choices), else acc."""
    return "acc_norm" if "acc_norm" in entry else "acc"


def zero_shot_summary(scores: dict[str, dict], reference: dict[str, dict] | None = None) -> dict[str, float]:
    """The mean accuracy over the zero-shot tasks in `scores` (`headline_metric`) with the stderr of that mean (tasks
    independent), how many tasks, and each task's accuracy; {} when none was scored. With the `reference` model's
    scores (the teacher's) on the same items, also the gap to it, paired (`zero_shot_gap`)."""
    tasks = {k: v for k, v in scores.items() if "acc" in v and "samples" in v}
    if not tasks:
        return {}
    accs = {k: v[headline_metric(v)] for k, v in tasks.items()}
    errs = [v.get(f"{headline_metric(v)}_stderr") or 0.0 for v in tasks.values()]
    summary = {"zero_shot_mean": sum(accs.values()) / len(accs),
               "zero_shot_stderr": sum(e * e for e in errs) ** 0.5 / len(errs), "tasks": len(accs), "zero_shot": accs}
    return summary | (zero_shot_gap(tasks, reference) if reference else {})


def zero_shot_gap(scores: dict[str, dict], reference: dict[str, dict]) -> dict[str, float]:
    """The mean over tasks of (model - reference) accuracy with its stderr taken over the per-item differences: both
    models answer the same items, so most of each score's sampling noise cancels and a gap several times smaller
    than either score's stderr can be told from zero. Tasks where either side lacks per-item outcomes (`items`) or
    they do not pair up are left out; {} when none is left."""
    gaps, variances = [], []
    for task, entry in scores.items():
        mine, theirs = entry.get("items"), reference.get(task, {}).get("items")
        if not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
            continue
        diffs = [a - b for a, b in zip(mine, theirs)]
        mean = sum(diffs) / len(diffs)
        gaps.append(mean)
        variances.append(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    if not gaps:
        return {}
    return {"zero_shot_gap": sum(gaps) / len(gaps), "zero_shot_gap_stderr": sum(variances) ** 0.5 / len(gaps),
            "gap_tasks": len(gaps)}


@dataclass
class TradeCurve:
    """`compare --equal-bound`: quality against predicted speed, per method. `points` are scored before training
    (perplexity on the validation text, retrieval-probe accuracy, and with tasks the zero-shot mean); `trained` holds
    each method's distilled point."""

    metric: str  # the bound the points are chosen by: prefill, decode or kv
    teacher: dict  # {"perplexity": ..., "retrieval": ..., and with tasks `zero_shot_summary`'s fields}
    points: dict[str, list[dict]] = field(default_factory=dict)  # method label -> points, in target order
    trained: dict[str, list[dict]] = field(default_factory=dict)  # method label -> its distilled points
    unreachable: dict[str, dict] = field(default_factory=dict)  # method label -> {target: the most it reaches}

    def add(self, label: str, point: dict) -> None:
        self.points.setdefault(label, []).append(point)

    def distilled(self, label: str, target: float, bounds: dict[str, float], scores: dict[str, dict],
                  reference: dict[str, dict], speed: dict | None = None) -> None:
        """The distilled student's point, from `evaluate`'s scores: perplexity, probe, zero-shot mean and its gap to
        the `reference` (the teacher's scores); and its short measured speed (`commands.bench.quick_speed`) where timed."""
        point = {"target": target, "bounds": bounds, **point_perplexities(scores), "measured": speed or {}}
        point["retrieval"] = next((v["acc"] for k, v in scores.items() if k.startswith("retrieval")), None)
        self.trained.setdefault(label, []).append(point | zero_shot_summary(scores, reference))

    def lines(self) -> list[str]:
        out = []
        for label, points in self.points.items():
            for p in points:
                sign = "<=" if self.metric in AT_MOST else ">="
                out.append(f"{label} at {self.metric} {sign} {p['target']}: {p['followers']} followers, bounds prefill "
                           f"{p['bounds']['prefill']:.3f}x decode {p['bounds']['decode']:.3f}x kv {p['bounds']['kv']:.3f}"
                           f", perplexity {p['perplexity']:.2f}"
                           + (f" (other text {p['other_perplexity']:.2f})" if "other_perplexity" in p else "")
                           + (f", key tokens {p['key_perplexity']:.2f}" if "key_perplexity" in p else "")
                           + f", retrieval {p['retrieval']:.3f}"
                           + (f", zero-shot {p['zero_shot_mean']:.3f}" if "zero_shot_mean" in p else ""))
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> TradeCurve | None:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["trained"] = {k: v if isinstance(v, list) else [v] for k, v in data.get("trained", {}).items()}  # 1 each before
        return cls(**data)
