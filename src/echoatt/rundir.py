"""The run folder (OUT): where each command reads and writes, which student it holds, and how a command starts
(seed, threads, device, the resolved config saved beside the run). Every file name of a run folder is spelt here.

A run folder holds one student at a time. Its identity — teacher, plan, method, head map and a hash of its config —
is written beside it (`student/sharing.json`) and into every checkpoint, so `distill` never resumes a checkpoint of
another student and `share` never puts a new student beside an old one's training (unless told to clear it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from echoatt.common import first_line, is_model_folder
from echoatt.configuration_echoatt import DROPPED, LINEAR
from echoatt.plan import AT_MOST

if TYPE_CHECKING:  # this module needs no torch to be imported: `report` reads run folders without it
    from echoatt.config import CommonConfig

# Config fields that say how a student runs, not what it is: they may change without making it another student.
RUNTIME_FIELDS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "reuse_path", "reuse_crossover",
                  "use_cache", "architectures", "auto_map")


def threads_of(config: CommonConfig) -> int:
    """The CPU thread count to pin: the one asked for, else torch's own default for this machine (its physical
    cores), set explicitly so that nothing later changes it mid-run."""
    import torch

    return config.threads or torch.get_num_threads()


def setup(config: CommonConfig) -> None:
    """Seed and pin the thread count, before a command does any work."""
    import torch

    torch.manual_seed(config.seed)
    torch.set_num_threads(threads_of(config))


def device_of(config: CommonConfig) -> str:
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


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
class SharingInfo:
    """What `share` built, saved beside the student (and copied beside the distilled one)."""

    identity: dict  # teacher, plan, method, head map, config hash (`student_identity`)
    plan: list[list[int]]  # blocks, leader first
    method: str
    head_map: str | None
    lisa: dict | None  # rank and hidden width of LiSA's parts
    parameters: dict  # teacher, student, removed, removed_percent
    kv_cache_bytes_per_token_bf16: dict  # teacher, student
    calibration: dict | None = None  # windows, ridge, error before/after (calibrate.CalibrationReport), or None
    bounds: dict | None = None  # the cost model's promise (`student.plan_bounds`): prefill, decode, kv
    dropped: list[int] = field(default_factory=list)  # a mixed plan's layers whose attention is left out
    linear: list[int] = field(default_factory=list)  # layers whose attention is a fitted linear map
    ffn: list[list[int]] = field(default_factory=list)  # [layer, width] of each narrowed or dropped FFN
    family: dict = field(default_factory=dict)  # the teacher's architecture and family fields (`family_fields`)

    def save(self, student_dir: Path) -> None:
        (student_dir / SHARING_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, student_dir: Path) -> SharingInfo | None:
        path = student_dir / SHARING_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


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


class RunDirError(ValueError):
    """A run folder that holds something other than what the command was given."""


SHARING_FILE = "sharing.json"  # beside every student checkpoint: what the student is (`SharingInfo`)


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint: a loadable student, accelerate's state, and the step and student it belongs to."""

    path: Path

    @property
    def student(self) -> Path:
        return self.path / "student"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def trainer(self) -> Path:
        return self.path / "trainer.json"

    def read(self) -> dict:
        """{"step": N, "student": identity} (identity None for checkpoints from before identities were kept)."""
        return json.loads(self.trainer.read_text())

    def complete(self) -> bool:
        return self.trainer.is_file()


@dataclass(frozen=True)
class RunDir:
    """Every path of a run folder, named once. `repair`: the local-repair stage's own checkpoints, log, summary and
    student (`student-repaired`), which the global distillation then starts from."""

    root: Path
    repair: bool = False

    def checkpoint(self, step: int, partial: bool = False) -> Checkpoint:
        return Checkpoint(self.checkpoints / (f"step-{step:06d}" + (".partial" if partial else "")))

    def finished_checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        found = sorted(p for p in self.checkpoints.glob("step-*") if not p.name.endswith(".partial"))
        return [Checkpoint(p) for p in found]

    @property
    def latest_pointer(self) -> Path:
        """A file naming the newest complete checkpoint, replaced atomically after it is written."""
        return self.checkpoints / "latest"

    def latest(self) -> Checkpoint | None:
        if not self.latest_pointer.is_file():
            return None
        found = Checkpoint(self.checkpoints / self.latest_pointer.read_text().strip())
        return found if found.complete() else None

    def results(self, name: str) -> tuple[Path, Path]:
        """A results table as JSON and Markdown: `eval`, `compare`, or `bench[-ARCH]`."""
        return self.root / f"{name}.json", self.root / f"{name}.md"

    def bench_results(self) -> list[Path]:
        return sorted(self.root.glob("bench*.json"))

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def report(self) -> tuple[Path, Path]:
        return self.root / "report.md", self.root / "report.html"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def distilled(self) -> Path:
        return self.root / ("student-repaired" if self.repair else "student-distilled")

    @property
    def checkpoints(self) -> Path:
        return self.root / ("checkpoints-repair" if self.repair else "checkpoints")

    @property
    def log(self) -> Path:
        return self.root / ("repair_log.jsonl" if self.repair else "log.jsonl")

    @property
    def distill_summary(self) -> Path:
        return self.root / ("repair_summary.json" if self.repair else "distill_summary.json")

    @property
    def similarity(self) -> Path:
        return self.root / "similarity.json"

    @property
    def heatmap(self) -> Path:
        return self.root / "attention_similarity.png"

    @property
    def trade_curve(self) -> Path:  # compare --equal-bound
        return self.root / "trade_curve.json"

    @property
    def trade_plot(self) -> Path:
        return self.root / "trade_curve.png"

    @property
    def block_effects(self) -> Path:  # the measured loss of each candidate block (budget plans)
        return self.root / "block_effects.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def config_file(self, command: str) -> Path:
        return self.root / f"{command}.yaml"

    def student_outputs(self) -> list[Path]:
        """What belongs to the student in this folder (cleared by `share --overwrite`); the teacher's analysis stays."""
        repair = RunDir(self.root, repair=True)
        return [self.student, self.distilled, self.checkpoints, self.log, self.distill_summary, self.summary,
                *self.results("eval"), *self.report, self.curves, self.config_file("distill"), repair.distilled,
                repair.checkpoints, repair.log, repair.distill_summary, self.config_file("repair")]

    def clear_student(self) -> None:
        for path in self.student_outputs():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def config_hash(config: dict) -> str:
    """A short hash of what a student is (its config without the fields that only say how it runs)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def student_identity(config, teacher: str, calibration: dict | None = None) -> dict:
    """Teacher, plan (followers and their type, dropped layers apart: a mixed student has both), head map and
    calibration in words, and the config hash that decides with them."""
    cfg = config.to_dict()
    source = cfg.get("attention_source") or []
    followers, dropped = sharing_roles(source)
    return {
        "teacher": teacher,
        "attention_source": source,
        "follower_type": cfg.get("follower_type", "copy") if followers else None,
        "dropped": dropped,
        "head_map": cfg.get("head_map"),
        "calibration": calibration,
        "config_hash": config_hash(cfg),
    }


def read_student_config(path: Path, what: str = "student"):
    """The config of a student folder, or one line saying why it is not one (before any long work)."""
    if not is_model_folder(path):
        raise RunDirError(f"no {what} checkpoint at {path} (no config.json; run `echoatt share` first)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunDirError(f"{path}/config.json is damaged or not a model config ({first_line(err)})") from err


def saved_identity(student_dir: Path) -> dict | None:
    """The identity `share` recorded beside a student, if any."""
    info = SharingInfo.load(student_dir)
    return info.identity if info else None


def identity_of(student_dir: Path) -> dict:
    """A student folder's identity: the recorded one, else computed from its config (teacher unknown)."""
    config = read_student_config(student_dir)
    recorded = saved_identity(student_dir)
    current = config_hash(config.to_dict())
    if recorded and recorded.get("config_hash") == current:
        return recorded
    if recorded is None:
        return student_identity(config, teacher=None)
    return student_identity(config, recorded.get("teacher"), recorded.get("calibration"))


def same_student(a: dict | None, b: dict | None) -> bool:
    """Same config, teacher and calibration settings (the weights a student starts from follow from them)."""
    key = lambda x: (x["config_hash"], x["teacher"], x.get("calibration"))
    return a is not None and b is not None and key(a) == key(b)


def sharing_roles(source: list[int]) -> tuple[list[int], list[int]]:
    """From an `attention_source` list: the layers that follow another, and those whose attention is dropped (a
    linear map is neither)."""
    return ([i for i, s in enumerate(source) if s not in (i, DROPPED, LINEAR)],
            [i for i, s in enumerate(source) if s == DROPPED])


def describe(identity: dict) -> str:
    followers, dropped = sharing_roles(identity["attention_source"])
    maps = identity.get("head_map") or []
    heads = "mapped heads" if any(m is not None and m != list(range(len(m))) for m in maps) else "same-index heads"
    calibrated = "calibrated" if identity.get("calibration") else "not calibrated"
    linear = [i for i, s in enumerate(identity["attention_source"]) if s == LINEAR]
    parts = ([f"{identity.get('follower_type')} followers {followers}, {heads}"] if followers else []) + (
        [f"attention dropped at {dropped}"] if dropped else []) + ([f"linear attention at {linear}"] if linear else [])
    return (f"teacher {identity['teacher']}, {', '.join(parts) or 'no sharing'}, {calibrated}, "
            f"config {identity['config_hash']}")
