"""Distil the shared-attention student from its frozen teacher.

Shaped like torchtune's KD recipe — `setup` (load, validate, prepare, resume), `train_step`, `train` (the loop, its
guards and checkpoints), `finish` (save) — on `accelerate`, so the same code runs on one CPU, one GPU, or many under
`accelerate launch` / `torchrun` (DDP or FSDP; configs in `configs/accelerate/`). The objective is `losses.KDLoss`;
checkpoints are `checkpoints.py`'s. With `--local-steps`, a local-repair stage (`repair.LocalLoss`: each changed layer
trained alone on the teacher's stream) runs first through the same loop, with its own checkpoints, log and output
(`student-repaired`, which the global distillation starts from).

Reproducible and resumable: the data order is a pure function of (seed, step) — step s, micro-batch m, process r
reads fixed positions of a per-epoch permutation — and model, optimizer, scheduler and RNG states are checkpointed, so
a resumed run continues to the same losses as one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from echoatt.building.repair import LocalLoss, repaired_layers
from echoatt.common import TrainingError, check_disk_room
from echoatt.evaluation.key_tokens import GainCache, context_weights
from echoatt.evaluation.metrics import nll_sum
from echoatt.inputs.corpus import generated_windows, spread, token_windows
from echoatt.inputs.teacher import Teacher, load_teacher
from echoatt.model.configuration_echoatt import is_lisa_parameter, role_of
from echoatt.run.config import DistillConfig, device_of, record, setup
from echoatt.run.rundir import SHARING_FILE, RunDir, identity_of
from echoatt.training.checkpoints import (
    checkpoint_bytes,
    latest_step,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    weight_bytes,
)
from echoatt.training.losses import KDLoss
from echoatt.training.memory import free_memory, peak_memory_bytes, reset_peak_memory
from echoatt.training.precision import Precision, resolve
from echoatt.training.teacher_cache import TeacherCache

TRAINABLE = ("auto", "changed", "shared", "lisa", "all")


def set_trainable(student: torch.nn.Module, mode: str) -> list[str]:
    """Freeze all but what `mode` trains; return the trainable parameter names.

    `changed`: the layers whose attention changed (followers, dropped attention). `shared`: those and the layer
    right after each (which first sees the changed residual stream). `lisa`: only LiSA's head-alignment and low-rank
    parameters (the paper's setting). `all`: every parameter. `auto`: `lisa` for a student with LiSA followers (the
    paper's setting), else `all` (on the default teacher it recovered more perplexity than `shared` in the same 30
    steps, at the same zero-shot gap; a LiSA plan that came out as dropped layers only trains like any other)."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE} (got {mode!r})")
    config = student.config
    if mode == "auto":
        mode = "lisa" if any(role_of(config, i) == "lisa" for i in range(config.num_hidden_layers)) else "all"
    changed, layers = set(repaired_layers(config, False)), set(repaired_layers(config, True))
    names = []
    for name, param in student.named_parameters():
        parts = name.split(".")
        in_layer = len(parts) > 3 and parts[1] == "layers" and int(parts[2]) in layers
        lisa_part = is_lisa_parameter(name)
        in_changed = in_layer and int(parts[2]) in changed
        param.requires_grad_(mode == "all" or (mode == "shared" and in_layer) or (mode == "changed" and in_changed)
                             or (mode == "lisa" and lisa_part))
        if param.requires_grad:
            names.append(name)
    if not names:
        raise TrainingError("nothing to train: the student has no followers (use --trainable all)")
    return names


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing on or off under the name the installed transformers uses (`activation_...` from 5.24,
    where the older `gradient_...` warns; only the older before)."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{kind}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{kind}_checkpointing_disable")()


def param_groups(student: torch.nn.Module, config: DistillConfig) -> list[dict]:
    """Trainable parameters with their peak learning rates: LiSA's small, zero-started parts at `lisa_lr` (like LoRA,
    they need a larger step than pretrained weights), everything else at `lr`."""
    groups: dict[float, list] = {}
    for name, param in student.named_parameters():
        if param.requires_grad:
            groups.setdefault(config.lisa_lr if is_lisa_parameter(name) else config.lr, []).append(param)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def batch_indices(step: int, micro: int, config: DistillConfig, num_windows: int, rank: int, world: int) -> torch.Tensor:
    """Which training windows (step, micro, rank) reads: fixed by the seed, independent of any resume."""
    per_step = config.batch_size * config.grad_accum * world
    first = step * per_step + (micro * world + rank) * config.batch_size
    positions = torch.arange(first, first + config.batch_size)
    out = torch.empty_like(positions)
    for epoch in positions.div(num_windows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_windows, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        hit = positions.div(num_windows, rounding_mode="floor") == epoch
        out[hit] = perm[positions[hit] % num_windows]
    return out


def lr_lambda(config: DistillConfig):
    """Linear warm-up, then cosine decay to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def validation_perplexity(accelerator: Accelerator, student, windows: torch.Tensor) -> float:
    """Perplexity over `windows`, each process scoring its share, summed across processes."""
    shard = windows[accelerator.process_index :: accelerator.num_processes]
    total, count = nll_sum(student, shard) if len(shard) else (0.0, 0)
    sums = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), reduction="sum")
    return math.exp(sums[0].item() / max(sums[1].item(), 1.0))


@dataclass
class Training:
    """Everything one distillation run holds between its steps."""

    config: DistillConfig
    run: RunDir
    accelerator: Accelerator
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    loss: KDLoss | LocalLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_windows: torch.Tensor
    val_windows: torch.Tensor
    identity: dict
    student_dir: Path
    precision: Precision  # bf16 autocast or fp32 (`precision.resolve`)
    teacher_cache: TeacherCache | None = None
    gain_cache: GainCache | None = None  # with --w-long: the teacher's context gain per training window
    matmul_share: float | None = None  # of the profiled step's time (`profiled`)
    speeds: list[float] = field(default_factory=list)  # tokens/s of this process's steps, the profiled one aside
    start: int = 0
    trained: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def training_speed(self) -> dict:
        """What the steps ran in and how fast: the precision, the median tokens/s of the steps this process ran (the
        profiled one aside) and the share of the profiled step's time in matmuls (`profiled`)."""
        return {"precision": self.precision.as_dict(),
                "tokens_per_s": statistics.median(self.speeds) if self.speeds else None,
                "matmul_share": self.matmul_share}

    def log(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            with self.run.log.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def checkpoint(self, step: int) -> None:
        save_checkpoint(self.accelerator, self.student, self.tokenizer, self.run, step, self.config.keep_checkpoints,
                        self.identity)

    def validate(self, step: int) -> dict:
        entry = {"step": step, "val_ppl": validation_perplexity(self.accelerator, self.student, self.val_windows)}
        self.history.append(entry)
        self.log(entry)
        return entry


def make_accelerator(config: DistillConfig) -> tuple[Accelerator, Precision]:
    """The run's `Accelerator`, on the device `--device` names. Accelerate places a single process on the current
    CUDA device, so `cuda:N` becomes the current device first (else distillation would run on GPU 0 while the rest of
    `run` uses N); under `accelerate launch` / `torchrun` each process takes its own GPU, and an index is refused."""
    device = torch.device(device_of(config))
    if device.type == "cuda" and device.index is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--device {device}: under accelerate launch or torchrun each process takes its own GPU; "
                             "use --device cuda (or auto)")
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls (all of them without bf16 autocast)
    precision = resolve(config.bf16, device)  # bf16 autocast where the device multiplies bf16 natively
    return Accelerator(mixed_precision="bf16" if precision.bf16 else "no", cpu=device.type == "cpu"), precision


def load_inputs(config: DistillConfig, teacher: Teacher | None, accelerator: Accelerator,
                repair: bool = False) -> dict:
    """Student, teacher and text, each checked before any training: a missing or damaged student, a checkpoint of
    another student, a window longer than the model takes or a corpus too short for one step are refused here. The
    student: `--student` or OUT/student; the repaired one where a repair stage ran before this distillation."""
    run = RunDir(Path(config.out), repair=repair)
    student_dir = Path(config.student) if config.student else run.student
    if config.local_steps and not repair:
        student_dir = RunDir(run.root, repair=True).distilled
    identity = identity_of(student_dir)
    resume_from = resume_point(run, config.resume, identity)
    teacher = teacher or load_teacher(config.teacher, context=config.seq_len)
    tokenizer = teacher.text_tokenizer("distillation")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    max_len = student.config.max_position_embeddings
    if config.seq_len > max_len:
        raise ValueError(f"--seq-len {config.seq_len} is above the model's max_position_embeddings ({max_len})")
    train, val = token_windows(tokenizer, config.corpus, config.seq_len, config.encoding)
    if config.generated:  # the run reads `seen` windows: that share written by the teacher, the rest spread over the corpus
        seen = config.steps * config.batch_size * config.grad_accum * accelerator.num_processes
        count = max(1, round(config.generated * seen))
        teacher.model.to(accelerator.device)
        with accelerator.main_process_first():  # one process writes the cache, the others read it
            written = generated_windows(teacher, count, config.seq_len, config.seed)
        train = torch.cat([spread(train, seen - count), written.cpu()])
    needed = config.batch_size * accelerator.num_processes
    if len(train) < needed:
        raise ValueError(f"the corpus gives {len(train)} training windows of {config.seq_len} tokens; "
                         f"one step needs {needed}")
    return {"run": run, "student_dir": student_dir, "identity": identity, "resume_from": resume_from,
            "teacher": teacher, "tokenizer": tokenizer, "student": student, "train_windows": train,
            "val_windows": spread(val, config.eval_windows)}


def repair_config(config: DistillConfig) -> DistillConfig:
    """The local-repair stage's settings: its own steps and learning rate, the changed layers (and the one after each)
    trained, other windows than the distillation's first ones (seed + 1), validation at its end."""
    return replace(config, steps=config.local_steps, lr=config.local_lr, eval_every=0, seed=config.seed + 1,
                   trainable="shared" if config.local_next else "changed",
                   warmup_steps=min(config.warmup_steps, max(1, config.local_steps // 5)))


def setup_training(config: DistillConfig, teacher: Teacher | None = None, repair: bool = False) -> Training:
    """Validate and load every input, then prepare model, optimizer and scheduler and resume where asked. `repair`:
    the local-repair stage (`config` as `repair_config` makes it)."""
    config.validate()
    setup(config)
    accelerator, precision = make_accelerator(config)
    accelerator.print(precision.line())
    inputs = load_inputs(config, teacher, accelerator, repair)
    record(config, "repair" if repair else "distill")
    student = inputs.pop("student")
    set_trainable(student, config.trainable)
    if config.gradient_checkpointing:
        set_checkpointing(student, True)
    student.train()
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in student.parameters())
    optimizer = torch.optim.AdamW(param_groups(student, config), weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    sizes = {"checkpoint": checkpoint_bytes(student), "weights": weight_bytes(student)}  # before `prepare` shards
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    resume_from = inputs.pop("resume_from")
    loss = LocalLoss(config.local_next) if repair else config.kd_loss()
    loaded = inputs.pop("teacher")
    frozen = loaded.model
    if teacher is None and accelerator.mixed_precision == "bf16":  # loaded here, so ours to cast: under bf16 autocast
        frozen.to(dtype=torch.bfloat16)  # its matmuls are bf16 anyway; each process (FSDP too) holds half the bytes
    training = Training(config=config, accelerator=accelerator, student=student, loss=loss,
                        teacher=frozen.to(accelerator.device).eval().requires_grad_(False),
                        optimizer=optimizer, scheduler=scheduler, precision=precision, **inputs,
                        trained={"trained": n_train, "total": n_all, "percent": 100 * n_train / n_all})
    if config.teacher_cache and not repair:  # the local repair reads the teacher's stream, not these outputs
        training.teacher_cache = TeacherCache(TeacherCache.where(config.teacher_cache), loaded.stamp(),
                                              config.cache_top_k, config.temperature, training.teacher,
                                              autocast=precision.bf16)
    if config.w_long and not repair:
        training.gain_cache = GainCache(loaded.stamp(), training.teacher)
    if resume_from is not None:
        training.start = load_checkpoint(accelerator, resume_from)
        accelerator.print(f"resuming from {resume_from.path} at step {training.start}")
    check_room(training, **sizes)  # on every process: each refuses alike, none left waiting for another
    if accelerator.is_main_process:
        log = training.run.log
        kept = [ln for ln in (log.read_text().splitlines() if log.exists() and training.start else [])
                if json.loads(ln)["step"] <= training.start]
        log.write_text("".join(ln + "\n" for ln in kept))
        training.history = [json.loads(ln) for ln in kept if "val_ppl" in json.loads(ln)]
        print(f"training {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.1f}%, "
              f"--trainable {config.trainable})")
    return training


def check_room(t: Training, checkpoint: int, weights: int) -> None:
    """Refuse, before the first step, a run whose writes would not fit on disk — the teacher outputs it caches, its
    checkpoints (`keep` + 1 exist while the newest is written; a resumed run adds at least one to those there) and
    the trained student (`weights` bytes; a checkpoint `checkpoint`) — rather than stopping at a save with the steps
    since the last one lost; else say what the cache takes."""
    config = t.config
    saves = sum(config.saves_at(step) for step in range(t.start + 1, config.steps + 1))
    room = config.keep_checkpoints + 1 - len(t.run.finished_checkpoints())  # new ones beside those kept, at most
    count = max(1, min(saves, room)) if saves else 0  # each save writes before it prunes: one more at least
    needs = [(f"{count} checkpoint(s) of {checkpoint / 2**30:.2f} GiB", t.run.checkpoints, count * checkpoint),
             ("the trained student", t.run.distilled, weights)]
    hint = "free some, or keep fewer checkpoints (--keep-checkpoints)"
    if t.teacher_cache:
        read = config.steps * config.batch_size * config.grad_accum * t.accelerator.num_processes
        size, said = t.teacher_cache.room(t.teacher.config, config.seq_len, min(read, len(t.train_windows)))
        needs.append(("teacher outputs", t.teacher_cache.folder, size))
        hint += ", put the teacher outputs elsewhere (--teacher-cache DIR) or take fewer steps"
        t.accelerator.print(said)
    check_disk_room(needs, hint)


def train_step(t: Training, step: int) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; the loss terms averaged over them."""
    config, accelerator = t.config, t.accelerator
    sums: dict[str, float] = {}
    for micro in range(config.grad_accum):
        rows = batch_indices(step, micro, config, len(t.train_windows), accelerator.process_index,
                             accelerator.num_processes)
        ids = t.train_windows[rows].to(accelerator.device)
        weighted = ({"weights": context_weights(t.gain_cache.gains(t.teacher, ids), config.w_long).to(accelerator.device)}
                    if t.gain_cache else {})  # key-token weighting (the local repair's loss takes none)
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(t.student), accelerator.autocast():
            cached = {"cached": t.teacher_cache.outputs(t.teacher, ids)} if t.teacher_cache else {}
            terms = t.loss(t.student, t.teacher, ids, **cached, **weighted)
            finite = torch.tensor(float(not torch.isfinite(terms["loss"])), device=accelerator.device)
            if accelerator.reduce(finite, "sum").item() > 0:
                kept = t.run.latest()
                raise TrainingError(f"non-finite loss at step {step + 1}; stopped. Last good checkpoint: "
                                    f"{kept.path if kept else 'none'}")
            accelerator.backward(terms["loss"] / config.grad_accum)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() / config.grad_accum
    return sums


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # and the fused attention kernels (sdpa)


def is_matmul(op: str) -> bool:
    return op in MATMULS or op.startswith("aten::_scaled_dot_product")


@contextlib.contextmanager
def profiled(t: Training, on: bool):
    """Profile the step inside where `on`: the share of its wall time spent in matrix multiplications (dense and
    attention kernels; device time on a GPU) lands in `t.matmul_share` — what is left is the step's overhead."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = t.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
    wall = time.perf_counter() - started
    spent = sum(e.self_device_time_total if cuda else e.self_cpu_time_total
                for e in prof.key_averages() if is_matmul(e.key))  # microseconds
    t.matmul_share = spent / 1e6 / wall


def train(t: Training) -> None:
    """The loop: steps, logs, validation and checkpoints; Ctrl-C saves the steps completed (never mid-update)."""
    config = t.config
    if t.start == 0 and not t.history:
        t.validate(0)
    tokens_per_step = config.batch_size * config.grad_accum * t.accelerator.num_processes * config.seq_len
    bar = tqdm(range(t.start, config.steps), initial=t.start, total=config.steps,
               desc="repair" if t.run.repair else "distill",
               disable=not t.accelerator.is_local_main_process)
    completed, updating = t.start, False
    try:
        for step in bar:
            started = time.perf_counter()
            reset_peak_memory(t.accelerator.device)  # the log's peak is this step's: what sizes a batch
            profile = step == t.start + 1  # the second step of this process: past the first one's warm-up
            with profiled(t, profile):
                sums = train_step(t, step)
                clip = config.max_grad_norm > 0
                grad_norm = t.accelerator.clip_grad_norm_(t.params, config.max_grad_norm) if clip else None
                updating = True  # an interrupt inside the update leaves a state that belongs to no step: not saved
                t.optimizer.step()
                t.scheduler.step()
                t.optimizer.zero_grad(set_to_none=True)
                completed, updating = step + 1, False
            speed = tokens_per_step / (time.perf_counter() - started)
            peak = peak_memory_bytes(t.accelerator.device)
            t.speeds += [] if profile else [speed]
            t.log({"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": t.scheduler.get_last_lr()[0],
                   "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": speed,
                   "peak_memory_bytes": peak, "precision": t.precision.name}
                  | ({"matmul_share": round(t.matmul_share, 4)} if profile else {}))
            if profile:
                bar.write(f"step {step + 1} profiled: matmuls take {t.matmul_share:.0%} of the step's time "
                          f"({t.precision.name})")
            shown = {k: f"{v:.3f}" for k, v in sums.items() if not k.startswith("layer_")}  # per layer: the log's
            bar.set_postfix(shown | {"tok/s": f"{speed:.0f}"}
                            | ({} if peak is None else {"peak": f"{peak / 2**30:.1f}GiB"}))
            done = step + 1 == config.steps
            if (config.eval_every and (step + 1) % config.eval_every == 0) or done:
                bar.write(f"step {step + 1}: validation perplexity {t.validate(step + 1)['val_ppl']:.2f}")
            if config.saves_at(step + 1):
                t.checkpoint(step + 1)
    except KeyboardInterrupt:
        if not updating and completed > latest_step(t.run):
            t.checkpoint(completed)
            t.accelerator.print(f"interrupted: saved step {completed}; continue with --resume auto")
        raise
    bar.close()
    if t.teacher_cache:
        t.accelerator.print(t.teacher_cache.summary())


def finish(t: Training) -> dict:
    """Save the distilled student (with what it is) and the run's summary."""
    final = t.run.distilled
    state_dict = t.accelerator.get_state_dict(t.student)
    model = t.accelerator.unwrap_model(t.student)
    if t.accelerator.is_main_process:
        if t.config.gradient_checkpointing:
            set_checkpointing(model, False)
        model.save_pretrained(final, state_dict=state_dict)
        t.tokenizer.save_pretrained(final)
        if (t.student_dir / SHARING_FILE).is_file():
            shutil.copy(t.student_dir / SHARING_FILE, final / SHARING_FILE)
        t.run.distill_summary.write_text(json.dumps(
            {"config": asdict(t.config), "parameters": t.trained, "validation": t.history,
             "training": t.training_speed()}, indent=2))
        print(f"wrote the {'repaired' if t.run.repair else 'distilled'} student to {final}")
    t.accelerator.wait_for_everyone()
    return {"validation": t.history, "student": final, "parameters": t.trained, "model": model,
            "training": t.training_speed()}


def distill(config: DistillConfig, teacher: Teacher | None = None) -> dict:
    """Train the student in OUT (or `config.student`) against the teacher — first the local repair where
    `--local-steps` asks for it —; return the validation history, the distilled student's folder and in-memory model,
    and the trained parameter counts."""
    if config.local_steps:
        teacher = teacher or load_teacher(config.teacher, context=config.seq_len)
        repair = setup_training(repair_config(config), teacher, repair=True)
        train(repair)
        finish(repair)
        repair.accelerator.free_memory()  # its optimizer state and prepared model go before the distillation's
        device = repair.accelerator.device
        del repair
        free_memory(device)
    training = setup_training(config, teacher)
    train(training)
    return finish(training)
