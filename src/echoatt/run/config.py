"""Typed configs for each command: dataclasses whose fields are the CLI flags (`cli.py` turns them into flags);
YAML in (`load_yaml`), resolved YAML out (`save_config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from echoatt.common import check_choice, closest, first_line
from echoatt.planning.plan import DEFAULT_PLAN
from echoatt.training.losses import KDLoss


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def options(cls: type) -> list[dataclasses.Field]:
    """The fields of a config that are options of its command: all but those the command sets itself
    (`SET_BY_COMMAND`: e.g. `compare` gives each of its students its own method and head map)."""
    return [f for f in dataclasses.fields(cls) if f.name not in getattr(cls, "SET_BY_COMMAND", ())]


def check_device(device: str) -> None:
    """Refuse, in one line and before any model loads, a device this machine's torch cannot use: a CUDA device on a
    CPU-only build of torch (the README's GPU setup installs a CUDA one) or on a machine without one, or a GPU index
    past the last."""
    if device in ("auto", "cpu"):
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or device.endswith(":"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto (got {device!r})")
    import torch

    if not torch.cuda.is_available():
        why = ("a CPU-only build (bash scripts/setup.sh --cuda installs a CUDA one)" if torch.version.cuda is None
               else f"built for CUDA {torch.version.cuda}, but it sees no GPU")
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) is {why}; or use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


@dataclass
class CommonConfig:
    teacher: str = opt("default", "teacher: HF model directory or hub id, a .gguf file, or 'default' (SmolLM2-135M)")
    corpus: str = opt("default", "text: a .txt/.jsonl file, a folder of them, a saved datasets folder, 'default' "
                      "(Austen and Brown), 'python-docs' (Python's documentation), or both: 'default,python-docs'")
    seq_len: int = opt(512, "tokens per training/analysis window")
    out: str = opt("runs/echoatt", "output folder")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    seed: int = opt(0, "random seed")
    threads: int = opt(0, "CPU threads for torch, pinned for the whole command (0: torch's default, the physical cores)")
    eval_windows: int = opt(16, "held-out validation windows scored for perplexity (at least 1)")
    encoding: str = opt("utf-8", "text encoding of corpus files (a file that does not decode is refused)")

    def validate(self) -> None:
        """Refuse settings that would run and give a wrong or empty answer (called before any long work)."""
        check_device(self.device)
        for name in ("seq_len", "eval_windows"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be at least {2 if name == 'seq_len' else 1} "
                                 f"(got {getattr(self, name)})")


@dataclass
class AnalyzeConfig(CommonConfig):
    num_sequences: int = opt(16, "training windows the attention similarity is measured on")
    threshold: float = opt(0.8, "head-matched similarity a layer needs to its leader for the suggested plan")

    def validate(self) -> None:
        super().validate()
        if self.num_sequences < 1 or not 0 < self.threshold <= 1:
            raise ValueError(f"--num-sequences must be at least 1 and --threshold in (0, 1] (got {self.num_sequences}, "
                             f"{self.threshold})")


@dataclass
class PrecisionConfig(CommonConfig):
    bf16: str = opt("auto", "bf16 autocast for the long work (distill's step and the teacher-cache fill, share's "
                    "measurement of candidates): auto (where the device multiplies bf16 natively: a GPU, a CPU with "
                    "AMX or AVX512-BF16), yes (refused on a CPU without), no (fp32); eval's scores stay fp32")

    def validate(self) -> None:
        super().validate()
        from echoatt.training.precision import resolve

        resolve(self.bf16, self.device)  # refuses --bf16 yes where bf16 is emulated, before any model loads


@dataclass
class ShareConfig(PrecisionConfig):
    plan: str = opt(DEFAULT_PLAN, "sharing plan (default: the fastest plan of the default teacher's "
                    "measured trade curve that keeps its quality, README 'Faster by default'): "
                    "budget=k=N (at least blind k=N's predicted speed, with the "
                    "blocks measured to cost least; ',drop': dropping a layer's attention is a candidate too), "
                    "budget=decode=X[,prefill=Y][,kv=Z][,protect=N][,max=3][,drop|,drop-only: dropped attention alone, a plan "
                    "llama.cpp and DeciLM engines run][,linear: attention replaced by a fitted linear map][,ffn: FFNs "
                    "narrowed to 3/4, 1/2, 1/4 or none], k=N[,first][,last][,followers=N][,protect=N], "
                    "threshold=X[,max=N][,protect=N], blocks like 1-2,4-6 (drop=N: layer N's attention dropped; "
                    "linear=N: replaced by a linear map; ffn=N:W: layer N's FFN at W channels, 0: none), or none")
    method: str = opt("copy", "copy (EchoAtt: followers reuse the leader's attention), lisa (head alignment + low-rank "
                      "correction, each follower reading the layer before it) or drop (the baseline: no attention)")
    head_map: str = opt("matched", "follower head -> leader head: matched (most similar head), grouped (most similar "
                        "within its KV group: keeps GQA on fused kernels) or identity (plain copy)")
    lisa_rank: int = opt(0, "LiSA: rank of the low-rank Q/K per head (0: head_dim // 6, the paper's 6x compression)")
    lisa_hidden: int = opt(0, "LiSA: hidden width of the head-alignment network (0: the number of heads)")
    similarity: str = opt("", "similarity.json from `echoatt analyze` (default: OUT/similarity.json, else analyse)")
    overwrite: bool = opt(False, "where OUT holds another student or its checkpoints, clear them (else refuse)")
    calibrate: int = opt(32, "training windows to refit each follower's o_proj on, against the teacher's attention "
                         "output, and to fit linear attention and narrowed FFNs on (0: off; needs the teacher's "
                         "tokenizer)")
    calibrate_ridge: float = opt(1e-2, "ridge of the refit, relative to the mean diagonal of Z^T Z")
    repair_blocks: int = opt(0, "budget plans: steps of local repair (2 windows a step) each candidate block gets "
                             "before its loss is measured, so blocks are ranked by what they cost once repaired "
                             "(0: as built)")
    allow_slower: bool = opt(False, "build a student the cost model predicts slower than the teacher (prefill or "
                             "decode bound below 1: LiSA's followers, or a plan too small to pay for its leaders' "
                             "handoff); refused otherwise")

    def validate(self) -> None:
        super().validate()
        from echoatt.building.student import StudentSpec

        StudentSpec(self.plan, self.method, self.head_map, self.lisa_rank, self.lisa_hidden).check()
        if self.similarity and not Path(self.similarity).is_file():
            raise FileNotFoundError(f"--similarity {self.similarity}: no such file (echoatt analyze writes one)")
        if self.calibrate < 0:
            raise ValueError(f"--calibrate is a number of windows, 0 for off (got {self.calibrate})")


@dataclass
class DistillConfig(PrecisionConfig):
    student: str = opt("", "student checkpoint folder to train (default: OUT/student, as `share` writes it)")
    steps: int = opt(30, "optimizer steps (the default run's 30 take about 8 minutes of its 20 on 2 CPU cores)")
    batch_size: int = opt(2, "windows per micro-batch per process")
    grad_accum: int = opt(2, "micro-batches per optimizer step")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    lisa_lr: float = opt(1e-2, "peak learning rate of LiSA's alignment and low-rank parameters")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    warmup_steps: int = opt(5, "linear warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    temperature: float = opt(KDLoss.temperature, "soft-label temperature")
    w_hard: float = opt(KDLoss.w_hard, "weight of the hard-label cross-entropy")
    w_soft: float = opt(KDLoss.w_soft, "weight of the soft-label KL (scaled by T^2)")
    w_hidden: float = opt(KDLoss.w_hidden, "weight of the hidden-state loss")
    hidden_loss: str = opt(KDLoss.hidden_loss, "hidden-state distance: mse (scale-normalised per layer) or cosine")
    generated: float = opt(0.0, "share of the training windows the teacher writes itself, sampled from the bare BOS "
                           "(data-free distillation: text beyond the corpus' kind; cached; 0: corpus only)")
    w_long: float = opt(0.0, "key-token weighting: each prediction's weight in the hard and soft terms is 1 + w_long x "
                        "the nats the teacher's log-probability gains from the context beyond the last 64 tokens "
                        "(capped at 4; key_tokens.py), so what needs the far context counts more (0: the plain loss)")
    trainable: str = opt("auto", "what trains: changed (the layers whose attention changed), shared (those and the layer after each), lisa (only LiSA's "
                         "alignment and low-rank parameters), all, or auto (lisa for a LiSA student, else all: "
                         "measured to recover more perplexity in the same steps, README 'Faster by default')")
    local_steps: int = opt(0, "steps of local repair before distillation: each changed layer (and the one after "
                           "each) trained alone to give the teacher layer's output from its input (0: none)")
    local_lr: float = opt(1e-3, "peak learning rate of the local repair")
    local_next: bool = opt(True, "the local repair also trains the layer after each changed one")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    eval_every: int = opt(10, "validation perplexity every N steps (0: only at the end)")
    save_every: int = opt(10, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    resume: str = opt("auto", "auto (continue from OUT/checkpoints/latest if present), never, or a checkpoint folder")
    teacher_cache: str = opt("", "keep the teacher's outputs on the training windows (its matched and final hidden "
                             "states) on disk and train later students from them without running its layers: auto "
                             "(the echoatt cache), a folder, or '' (off)")
    cache_top_k: int = opt(0, "with --teacher-cache: 0 keeps the final hidden states (exact logits through the "
                           "teacher's output layer); k > 0 keeps the top-k next-token log-probabilities instead (the "
                           "soft loss sees the rest of the vocabulary as one bucket)")

    def kd_loss(self) -> KDLoss:
        return KDLoss(self.w_hard, self.w_soft, self.w_hidden, self.temperature, self.hidden_loss)

    def saves_at(self, step: int) -> bool:
        """Whether a checkpoint is written once `step` steps are done: every `save_every` and at the end."""
        return bool(self.save_every and step % self.save_every == 0) or step == self.steps

    def validate(self) -> None:
        super().validate()
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be at least 1, the newest checkpoint --resume continues from "
                             f"(got {self.keep_checkpoints}); --save-every 0 writes one only at the end")
        if self.local_steps < 0:
            raise ValueError(f"--local-steps must be 0 (no local repair) or more (got {self.local_steps})")
        if self.cache_top_k < 0:
            raise ValueError(f"--cache-top-k is 0 (exact logits) or a number of tokens (got {self.cache_top_k})")
        if not 0 <= self.generated <= 1:
            raise ValueError(f"--generated is a share of the training windows, from 0 to 1 (got {self.generated})")
        if self.w_long < 0:
            raise ValueError(f"--w-long is a weight, 0 (off) or more (got {self.w_long})")
        from echoatt.evaluation.key_tokens import FAR_FROM

        if self.w_long and self.seq_len <= FAR_FROM:
            raise ValueError(f"--w-long weighs predictions with far context, from position {FAR_FROM} on: none has "
                             f"any in windows of --seq-len {self.seq_len}")
        check_choice("--trainable", self.trainable, ("auto", "all", "changed", "shared", "lisa"))
        check_choice("--hidden-loss", self.hidden_loss, ("mse", "cosine"))
        if self.student and not (Path(self.student) / "config.json").is_file():
            raise FileNotFoundError(f"--student {self.student}: not a model folder (no config.json); echoatt share "
                                    "writes one to OUT/student")


@dataclass
class EvalConfig(CommonConfig):
    models: str = opt("", "comma-separated model folders scored beside the teacher (default: OUT/student and "
                      "OUT/student-distilled, where present)")
    tasks: str = opt("hellaswag,winogrande,mmlu,arc_easy,arc_challenge,piqa,boolq,lambada",
                     "zero-shot tasks: local offline copies of these names, or any lm-eval task name ('' for none)")
    limit: int = opt(0, "items per task (0: all)")
    eval_batch_size: int = opt(8, "lm-eval batch size")
    other_text: str = opt("wikipedia", "text of another kind than the training text, scored for perplexity beside "
                          "the validation split (--eval-windows windows): 'wikipedia' (BoolQ's validation passages, "
                          "offline), any --corpus source, or '' for none")

    def validate(self) -> None:
        super().validate()
        from echoatt.evaluation.harness import check_task_names
        from echoatt.inputs.corpus import NAMED_CORPORA, OTHER_TEXT

        check_task_names([t for t in self.tasks.split(",") if t])
        if self.limit < 0:
            raise ValueError(f"--limit is items per task, 0 for all (got {self.limit})")
        for path in filter(None, self.models.split(",")):
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"--models: {path} is not a model folder (no config.json)")

        names = self.other_text.split(",")
        if self.other_text not in ("", OTHER_TEXT) and not all(n in NAMED_CORPORA for n in names) \
                and not Path(self.other_text).expanduser().exists():
            raise ValueError(f"--other-text {self.other_text!r}: no such file or folder (use {OTHER_TEXT!r}, a named "
                             "corpus, a text file or folder, or '' for none)")


@dataclass
class RunConfig(AnalyzeConfig, ShareConfig, DistillConfig, EvalConfig):
    """The main job: analyze -> share -> distill -> evaluate teacher, student before and after KD."""

    SET_BY_COMMAND: ClassVar[tuple[str, ...]] = ("student", "models", "similarity")  # the run's own, in OUT
    limit: int = opt(30, "zero-shot items per task in the main job (0: all; the default keeps it CPU-sized)")
    speed: bool = opt(True, "time teacher vs distilled student at the end: prefill 1 x 512 and decode 8 x 256 context, "
                      "3 repeats (about a minute on 2 CPU cores), beside the analytic bounds")


@dataclass
class CompareConfig(ShareConfig, DistillConfig, EvalConfig):
    """Attention drop, plain copy, head-matched copy and LiSA at the same layers, each distilled with the same
    budget."""

    SET_BY_COMMAND: ClassVar[tuple[str, ...]] = ("method", "head_map", "models", "student")  # each student's own
    methods: str = opt("drop,identity,matched,lisa", "which students: drop, identity (plain copy), matched, grouped, lisa, "
                       "mixed (with --equal-bound: shared blocks and dropped attention, as the default plan), drop-only "
                       "(with --equal-bound: dropped attention chosen by measured loss, a plan llama.cpp can run)")
    limit: int = opt(30, "zero-shot items per task (0: all; the default keeps it CPU-sized)")
    equal_bound: str = opt("", "compare at equal predicted speed instead of at the same layers: METRIC=V1[,V2,...] "
                           "(prefill, decode or kv), e.g. decode=1.05,1.10,1.15. Each method gets its own budget plan "
                           "per value (attention drop by LLM-Drop's criterion), scored before training (perplexity, "
                           "retrieval probe, the --tasks at --limit items): the trade curve; the first value is "
                           "distilled and scored in full")

    speed: bool = opt(True, "with --equal-bound: time each distilled student against the teacher (prefill 1 x 512, "
                      "decode 8 x 256 context, 3 repeats), beside its bounds")
    distill_points: str = opt("first", "with --equal-bound: which values' students are distilled and scored in full: "
                              "first, all (the whole curve, distilled: OUT/<method>-<metric><value>/ beyond the "
                              "first), or none")

    def bound_targets(self) -> tuple[str, list[float]]:
        """`equal_bound` as (metric, values), refused when it cannot be read."""
        metric, _, values = self.equal_bound.partition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v]
        except ValueError as err:
            raise ValueError(f"--equal-bound {self.equal_bound!r}: values must be numbers, e.g. decode=1.05,1.10") from err
        if metric not in ("prefill", "decode", "kv") or not numbers:
            raise ValueError(f"--equal-bound {self.equal_bound!r}: use prefill=, decode= or kv= and at least one value")
        return metric, numbers

    def validate(self) -> None:
        super().validate()
        from echoatt.building.student import VARIANTS

        for name in filter(None, self.methods.split(",")):
            check_choice("--methods: each", name, tuple(VARIANTS))
        if self.equal_bound:
            self.bound_targets()
        if self.distill_points not in ("first", "all", "none"):
            raise ValueError(f"--distill-points must be first, all or none (got {self.distill_points!r})")


@dataclass
class BenchConfig(CommonConfig):
    student: str = opt("", "student folder to measure (default: OUT/student; --engine vllm or llama.cpp: "
                       "OUT/student-distilled where present)")
    arch: str = opt("", "measure an architecture with random weights instead: a named shape (smollm2-135m, tinyllama, "
                    "qwen3-0.6b, qwen2.5-0.5b, llama-3.2-1b, mistral-7b) or a config.json; its student follows --plan")
    plan: str = opt("k=2", "sharing plan for --arch (e.g. k=2,followers=9 for the papers' 9 of 22)")
    method: str = opt("copy", "followers for --arch: copy, lisa or drop")
    prefill: str = opt("128,512", "prefill lengths (tokens, batch 1)")
    decode: str = opt("1x128,1x512,8x512", "decode settings, BATCHxCONTEXT")
    decode_steps: int = opt(8, "single-token steps timed per decode call")
    decode_cache: str = opt("dynamic", "decode's KV cache: dynamic (grows per step) or static (preallocated, what "
                            "CUDA graphs need; generate(cache_implementation='static') works for students)")
    compile: bool = opt(False, "torch.compile each decode step (on a GPU with mode reduce-overhead: CUDA graphs, "
                        "needs --decode-cache static), so decode time is the model's, not Python's launches")
    train_len: int = opt(256, "tokens of the timed training and distillation steps (0: skip them)")
    train_batch: int = opt(1, "sequences in the timed training step")
    repeats: int = opt(5, "timed repeats per candidate")
    warmup: int = opt(1, "untimed warm-up repeats")
    dtype: str = opt("auto", "float32, bfloat16, both (bfloat16 beside float32: OUT/bench-fp32.*) or auto (the "
                     "precision runs train in: bfloat16 on a GPU, both on a CPU that multiplies bf16 natively, float32 "
                     "on others)")
    engine: str = opt("torch", "torch (echoatt's own PyTorch model), vllm (teacher and student served by vLLM, from "
                      "the serve environment: offline throughput, prefill, decode and time to first token) or "
                      "llama.cpp (both exported to GGUF and timed in llama.cpp: pp and tg)")
    gguf_types: str = opt("f16,q8_0", "--engine llama.cpp: GGUF types teacher and student are exported to and timed at")
    gguf_prompt: int = opt(512, "--engine llama.cpp: prompt tokens processed in one batch (pp)")
    gguf_generate: int = opt(128, "--engine llama.cpp: tokens generated one at a time after the prompt (tg)")
    serve_cases: str = opt("throughput=64x512+128,prefill=64x512+1,decode=64x32+512,ttft=1x512+1",
                           "--engine vllm: cases as NAME=PROMPTSxLENGTH+NEW_TOKENS")

    def validate(self) -> None:
        super().validate()
        from echoatt.building.student import StudentSpec

        check_choice("--engine", self.engine, ("torch", "vllm", "llama.cpp"))
        check_choice("--decode-cache", self.decode_cache, ("dynamic", "static"))
        check_choice("--dtype", self.dtype, ("auto", "float32", "bfloat16", "both"))
        if self.arch:
            from echoatt.model.archs import ARCHS

            if self.arch not in ARCHS and not Path(self.arch).is_file():
                raise ValueError(f"--arch {self.arch}: not one of {', '.join(ARCHS)} nor a config.json file"
                                 f"{closest(self.arch, ARCHS)}")
            StudentSpec(self.plan, self.method, "identity").check()
        if self.student and not (Path(self.student) / "config.json").is_file():
            raise FileNotFoundError(f"--student {self.student}: not a model folder (no config.json)")
        try:
            self.prefill_lengths(), self.decode_settings()
        except ValueError:
            raise ValueError(f"--prefill takes lengths like 128,512 and --decode BATCHxCONTEXT settings like 1x128,8x512 "
                             f"(got {self.prefill!r}, {self.decode!r})") from None
        if self.compile and self.decode_cache != "static":
            raise ValueError("--compile needs --decode-cache static (a compiled step replays fixed shapes)")

    def prefill_lengths(self) -> list[int]:
        return [int(x) for x in self.prefill.split(",") if x]

    def decode_settings(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in x.split("x")) for x in self.decode.split(",") if x]


@dataclass
class ExportConfig:
    out: str = field(default="", metadata={"help": "where to write: a folder (--format decilm) or a .gguf file (--format gguf)", "positional": True})
    student: str = opt("runs/echoatt/student-distilled", "student checkpoint folder to export")
    format: str = opt("decilm", "decilm: a Nemotron-NAS / DeciLM folder that vLLM, SGLang, TensorRT-LLM load without "
                      "echoatt; gguf: one GGUF file (llama.cpp's deci architecture). Both take students whose layers "
                      "keep or drop attention")
    type: str = opt("f16", "gguf: tensor type of the weights, f32, f16 or q8_0 (norms stay f32)")
    tokenizer: str = opt("auto", "gguf: the tokenizer's source: auto (the teacher's own GGUF where the student's "
                         "teacher was one, else the student's tokenizer.json), a .gguf file, or hf")

    def validate(self) -> None:
        check_choice("--format", self.format, ("decilm", "gguf"))
        check_choice("--type", self.type, ("f32", "f16", "q8_0"))
        if not self.out:
            raise ValueError("name the output: echoatt export OUT (a folder for decilm, a .gguf file for gguf)")
        if not (Path(self.student) / "config.json").is_file():
            raise FileNotFoundError(f"--student {self.student}: not a student checkpoint (no config.json): run "
                                    "`echoatt run` or `echoatt share` first, or pass --student")


@dataclass
class ReportConfig:
    run: str = field(default="runs/echoatt", metadata={"help": "the run folder (OUT)", "positional": True})

    def validate(self) -> None:
        if not Path(self.run).is_dir():
            raise FileNotFoundError(f"{self.run}: no such run folder (echoatt run writes one)")


def load_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    """The options a YAML file (a recipe) sets for config class `cls`. One recipe serves every command: options of
    other commands (`steps` read by `share`) are left to them, names no command knows are refused."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--config {path}: cannot read it as YAML ({first_line(err)})") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: a recipe is a mapping of option: value")  # noqa: TRY004 (bad input: exit 2)
    anywhere = {f.name for c in (RunConfig, CompareConfig, BenchConfig, ExportConfig) for f in dataclasses.fields(c)}
    unknown = sorted(set(loaded) - anywhere)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}{closest(unknown[0], anywhere)}")
    mine = {f.name for f in options(cls)}
    return {k: v for k, v in loaded.items() if k in mine}


def threads_of(config: CommonConfig) -> int:
    """The CPU thread count to pin: the one asked for, else torch's own default for this machine (its physical
    cores), set explicitly so that nothing later changes it mid-run."""
    return config.threads or torch.get_num_threads()


def setup(config: CommonConfig) -> None:
    """Seed and pin the thread count, before a command does any work."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(threads_of(config))


def device_of(config: CommonConfig) -> str:
    """The device a command runs on: `auto` is CUDA where there is one."""
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def record(config: CommonConfig, name: str) -> Path:
    """The output folder, with the resolved config saved beside the run as `<name>.yaml`. Called once a command's
    inputs have proved usable, so a command refused on bad input leaves nothing behind."""
    from echoatt.run.rundir import RunDir

    run = RunDir(Path(config.out))
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(config, run.config_file(name))
    return run.root
