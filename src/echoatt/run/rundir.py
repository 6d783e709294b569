"""The run folder (OUT): where each command reads and writes, and which student it holds. Every file name of a run
folder is spelt here (what the results files hold: `results.py`; how a command starts: `config.py`).

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

from echoatt.common import first_line, is_model_folder
from echoatt.model.configuration_echoatt import FOLLOWER_TYPES, source_role
from echoatt.planning.plan import SharingPlan

# Config fields that say how a student runs, not what it is: they may change without making it another student.
RUNTIME_FIELDS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "reuse_path", "reuse_crossover",
                  "use_cache", "architectures", "auto_map")


@dataclass
class SharingInfo:
    """What `share` built, saved beside the student (and copied beside the distilled one)."""

    identity: dict  # teacher, plan, method, head map, config hash (`student_identity`)
    plan: str  # the plan as its spec (`SharingPlan.spec`): `27-28,drop=5,linear=12,ffn=5:768`, or `none`
    method: str
    head_map: str | None
    lisa: dict | None  # rank and hidden width of LiSA's parts
    parameters: dict  # teacher, student, removed, removed_percent
    kv_cache_bytes_per_token_bf16: dict  # teacher, student
    calibration: dict | None = None  # windows, ridge, error before/after (calibrate.CalibrationReport), or None
    bounds: dict | None = None  # the cost model's promise (`student.plan_bounds`): prefill, decode, kv
    family: dict = field(default_factory=dict)  # the teacher's architecture and family fields (`family_fields`)

    def sharing_plan(self) -> SharingPlan:
        """The plan read back from its spec, for the student's layer count (its attention source's length)."""
        return SharingPlan.read(self.plan, len(self.identity["attention_source"]))

    def save(self, student_dir: Path) -> None:
        (student_dir / SHARING_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, student_dir: Path) -> SharingInfo | None:
        path = student_dir / SHARING_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if isinstance(data["plan"], list):  # written before the plan was kept as its spec: a list per kind
            data["plan"] = SharingPlan(len(data["identity"]["attention_source"]), tuple(map(tuple, data["plan"])),
                                       tuple(data.pop("dropped", ())), tuple(data.pop("linear", ())),
                                       tuple(map(tuple, data.pop("ffn", ())))).spec()
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
    roles = sharing_roles(source)
    return {
        "teacher": teacher,
        "attention_source": source,
        "follower_type": cfg.get("follower_type", "copy") if roles["follows"] else None,
        "dropped": roles["dropped"],
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


def sharing_roles(source: list[int]) -> dict[str, list[int]]:
    """From an `attention_source` list, by `source_role`: the layers that follow another (`follows`), and those whose
    attention is dropped (`dropped`) or a linear map (`linear`)."""
    roles = [source_role(source, i) for i in range(len(source))]
    return {"follows": [i for i, r in enumerate(roles) if r in FOLLOWER_TYPES],
            **{kind: [i for i, r in enumerate(roles) if r == kind] for kind in ("dropped", "linear")}}


def describe(identity: dict) -> str:
    roles = sharing_roles(identity["attention_source"])
    maps = identity.get("head_map") or []
    heads = "mapped heads" if any(m is not None and m != list(range(len(m))) for m in maps) else "same-index heads"
    calibrated = "calibrated" if identity.get("calibration") else "not calibrated"
    parts = ([f"{identity.get('follower_type')} followers {roles['follows']}, {heads}"] if roles["follows"] else []) + (
        [f"attention dropped at {roles['dropped']}"] if roles["dropped"] else []) + (
        [f"linear attention at {roles['linear']}"] if roles["linear"] else [])
    return (f"teacher {identity['teacher']}, {', '.join(parts) or 'no sharing'}, {calibrated}, "
            f"config {identity['config_hash']}")
