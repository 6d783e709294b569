"""One function per command: each takes its config, writes into `config.out`, and returns what it made."""

from __future__ import annotations

from pathlib import Path

import torch

from echoatt.analysis import Similarity, attention_similarity
from echoatt.config import AnalyzeConfig, CommonConfig, RunConfig, ShareConfig, save_config
from echoatt.corpus import token_windows
from echoatt.modeling import EchoAttForCausalLM
from echoatt.plan import SharingPlan
from echoatt.student import build_student, head_maps, kv_cache_bytes_per_token, parameter_report, save_student
from echoatt.teacher import Teacher, load_teacher

SIMILARITY_FILE = "similarity.json"
HEATMAP_FILE = "attention_similarity.png"


def setup(config: CommonConfig, name: str) -> Path:
    """Seed, threads, output folder, and the resolved config saved beside the run."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / f"{name}.yaml")
    return out


def device_of(config: CommonConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def analyze(config: AnalyzeConfig, teacher: Teacher | None = None) -> Similarity:
    """Measure the teacher's layer x layer attention similarity; write similarity.json and a heatmap."""
    out = setup(config, "analyze")
    teacher = teacher or load_teacher(config.teacher, device=device_of(config))
    train, _ = token_windows(teacher.tokenizer, config.corpus, config.seq_len)
    n = min(config.num_sequences, len(train))
    windows = train[torch.linspace(0, len(train) - 1, n).long()]  # spread over the whole corpus
    settings = {"teacher": teacher.name, "corpus": config.corpus, "seq_len": config.seq_len, "sequences": n}
    similarity = attention_similarity(teacher.model, windows, settings=settings)
    similarity.save(out / SIMILARITY_FILE)
    similarity.heatmap(out / HEATMAP_FILE)
    suggested = SharingPlan.from_threshold(similarity.head_matched, config.threshold)
    print(similarity.summary())
    print(f"suggested plan (head-matched similarity >= {config.threshold}): {suggested.describe()}")
    print(f"wrote {out / SIMILARITY_FILE} and {out / HEATMAP_FILE}")
    return similarity


def find_similarity(config: ShareConfig) -> Similarity | None:
    path = Path(config.similarity) if config.similarity else Path(config.out) / SIMILARITY_FILE
    if config.similarity and not path.is_file():
        raise FileNotFoundError(f"no similarity file at {path}")
    return Similarity.load(path) if path.is_file() else None


def share(
    config: ShareConfig, teacher: Teacher | None = None, similarity: Similarity | None = None
) -> EchoAttForCausalLM:
    """Build the student for `config.plan`, save it to OUT/student, and print the parameter savings."""
    out = setup(config, "share")
    teacher = teacher or load_teacher(config.teacher, device=device_of(config))
    similarity = similarity or find_similarity(config)
    needs_analysis = config.head_map == "matched" or config.plan.startswith("threshold=")
    if similarity is None and needs_analysis:
        print("no similarity analysis found: measuring it first (echoatt analyze)")
        similarity = analyze(AnalyzeConfig(**{k: getattr(config, k) for k in CommonConfig.__dataclass_fields__}), teacher)
    layers = teacher.model.config.num_hidden_layers
    plan = SharingPlan.parse(config.plan, layers, similarity.head_matched if similarity else None)
    student = build_student(teacher.model, plan, head_maps(plan, similarity, config.head_map))
    params = parameter_report(teacher.model, student)
    kv = {
        "teacher": kv_cache_bytes_per_token(teacher.model.config),
        "student": kv_cache_bytes_per_token(student.config),
    }
    info = {"plan": [list(b) for b in plan.blocks], "head_map": config.head_map, "parameters": params, "kv_cache_bytes_per_token_bf16": kv}
    path = save_student(student, teacher.tokenizer, out / "student", info)
    print(f"plan: {plan.describe()} (head map: {config.head_map})")
    print(
        f"parameters: teacher {params['teacher']:,}  student {params['student']:,}  "
        f"removed {params['removed']:,} ({params['removed_percent']:.2f}%)"
    )
    print(f"KV cache per token (bf16): teacher {kv['teacher']:,} B  student {kv['student']:,} B")
    print(f"wrote the student to {path}")
    return student


def run(config: RunConfig) -> dict:
    """The main job on one teacher: analyze -> share."""
    setup(config, "run")
    teacher = load_teacher(config.teacher, device=device_of(config))
    similarity = analyze(config, teacher)
    student = share(config, teacher, similarity)
    return {"similarity": similarity, "student": student}
