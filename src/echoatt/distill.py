"""Adjust: distil the shared-attention student from its frozen teacher.

Shaped like torchtune's KD recipe (setup → train → save) on `accelerate`, so the same code runs on one CPU, one GPU,
or many under `accelerate launch` / `torchrun` (DDP or FSDP; configs in `configs/accelerate/`).

Reproducible and resumable: the data order is a pure function of (seed, step) — step s, micro-batch m, process r
reads fixed positions of a per-epoch permutation — and model, optimizer, scheduler and RNG states are saved with
`accelerator.save_state`. A checkpoint is written to `step-N.partial` and renamed when complete, then `latest` is
replaced atomically, so a kill mid-write never leaves a broken "latest".
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from echoatt.config import DistillConfig
from echoatt.corpus import spread, token_windows
from echoatt.losses import hard_label_loss, hidden_state_loss, soft_label_loss
from echoatt.metrics import nll_sum
from echoatt.modeling import is_lisa_parameter
from echoatt.rundir import RunDir, describe, device_of, identity_of, record, same_student, setup
from echoatt.teacher import Teacher, load_teacher

LATEST = "latest"


class TrainingError(RuntimeError):
    """Training stopped on bad input or a failure; the message says what was kept."""


TRAINABLE = ("auto", "shared", "lisa", "all")


def set_trainable(student: torch.nn.Module, mode: str) -> list[str]:
    """Freeze all but what `mode` trains; return the trainable parameter names.

    `shared`: the follower layers (whose attention changed) and the layer right after each (which first sees the
    changed residual stream). `lisa`: only LiSA's head-alignment and low-rank parameters (the paper's setting).
    `all`: every parameter. `auto`: `lisa` for a LiSA student, else `shared`."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE} (got {mode!r})")
    lisa = getattr(student.config, "follower_type", "copy") == "lisa"
    if mode == "auto":
        mode = "lisa" if lisa else "shared"
    followers = set(student.config.followers()) if hasattr(student.config, "followers") else set()
    layers = followers | {f + 1 for f in followers if f + 1 < student.config.num_hidden_layers}
    names = []
    for name, param in student.named_parameters():
        parts = name.split(".")
        in_layer = len(parts) > 3 and parts[1] == "layers" and int(parts[2]) in layers
        lisa_part = is_lisa_parameter(name)
        param.requires_grad_(mode == "all" or (mode == "shared" and in_layer) or (mode == "lisa" and lisa_part))
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


def distillation_losses(student, teacher, ids: torch.Tensor, config: DistillConfig) -> dict[str, torch.Tensor]:
    """Each loss term, unweighted, plus `loss` (the weighted sum) for one batch of windows (B, T)."""
    want_hidden = config.w_hidden > 0
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=want_hidden, use_cache=False)
    s_out = student(input_ids=ids, output_hidden_states=want_hidden, use_cache=False)
    terms = {"hard": hard_label_loss(s_out.logits, ids)}
    if config.w_soft > 0:
        terms["soft"] = soft_label_loss(s_out.logits, t_out.logits, ids, config.temperature)
    if want_hidden:
        # Outputs of decoder layers 1..L-1; [0] is the shared embedding, [L] the final-norm output that the logit
        # KL already constrains.
        layers = slice(1, len(t_out.hidden_states) - 1)
        terms["hidden"] = hidden_state_loss(
            list(s_out.hidden_states[layers]), list(t_out.hidden_states[layers]), kind=config.hidden_loss
        )
    weights = {"hard": config.w_hard, "soft": config.w_soft, "hidden": config.w_hidden}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def checkpoint_identities(run: RunDir) -> list[dict | None]:
    """The student each checkpoint in the run folder was trained from (None: unlabelled, from before labels)."""
    files = sorted(run.checkpoints.glob("step-*/trainer.json"))
    return [json.loads(f.read_text()).get("student") for f in files]


def resume_point(run: RunDir, resume: str, identity: dict) -> Path | None:
    """The checkpoint to continue from (`--resume`): none, the latest, or one named; never one of another student."""
    if resume == "never":
        return None
    path = latest_checkpoint(run.root) if resume == "auto" else Path(resume)
    if path is None:
        return None
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    saved = json.loads((path / "trainer.json").read_text()).get("student")
    if not same_student(saved, identity):
        was = describe(saved) if saved else "an unlabelled student"
        raise TrainingError(f"checkpoint {path} was trained from another student ({was}), not this one "
                            f"({describe(identity)}); use another --out, `echoatt share --overwrite`, or --resume never")
    return path


def latest_step(out: Path) -> int:
    path = latest_checkpoint(out)
    return json.loads((path / "trainer.json").read_text())["step"] if path else 0


def save_checkpoint(
    accelerator: Accelerator, student, tokenizer, out: Path, step: int, keep: int, identity: dict
) -> Path:
    """Write step-N atomically (partial folder, rename, then the `latest` pointer); prune old ones."""
    root = out / "checkpoints"
    final = root / f"step-{step:06d}"
    partial = root / f"step-{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial / "state"))
        state_dict = accelerator.get_state_dict(student)
        if accelerator.is_main_process:
            accelerator.unwrap_model(student).save_pretrained(partial / "student", state_dict=state_dict)
            tokenizer.save_pretrained(partial / "student")
            (partial / "trainer.json").write_text(json.dumps({"step": step, "student": identity}))
            shutil.rmtree(final, ignore_errors=True)
            partial.replace(final)
            tmp = root / (LATEST + ".tmp")
            tmp.write_text(final.name)
            tmp.replace(root / LATEST)
            done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".partial"))
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        kept = latest_checkpoint(out)
        reason = "disk full" if err.errno == errno.ENOSPC else str(err)
        raise TrainingError(f"could not write the checkpoint at step {step} ({reason}); kept: {kept or 'none'}") from err
    accelerator.wait_for_everyone()
    return final


def validation_perplexity(accelerator: Accelerator, student, windows: torch.Tensor) -> float:
    """Perplexity over `windows`, each process scoring its share, summed across processes."""
    shard = windows[accelerator.process_index :: accelerator.num_processes]
    total, count = nll_sum(student, shard) if len(shard) else (0.0, 0)
    sums = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), reduction="sum")
    return math.exp(sums[0].item() / max(sums[1].item(), 1.0))


def distill(config: DistillConfig, teacher: Teacher | None = None) -> dict:
    """Train the student in OUT (or `config.student`) against the teacher; return the validation history, the
    distilled student's folder and the trained parameter counts."""
    config.validate()
    setup(config)
    run = RunDir(Path(config.out))
    student_dir = Path(config.student) if config.student else run.student
    identity = identity_of(student_dir)  # refuses a missing or damaged student before any long work
    resume_from = resume_point(run, config.resume, identity)
    device = device_of(config)
    bf16 = config.bf16 == "yes" or (config.bf16 == "auto" and device.startswith("cuda"))
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device == "cpu")
    teacher = teacher or load_teacher(config.teacher)
    tokenizer = teacher.text_tokenizer("distillation")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    max_len = student.config.max_position_embeddings
    if config.seq_len > max_len:
        raise ValueError(f"--seq-len {config.seq_len} is above the model's max_position_embeddings ({max_len})")
    train, val = token_windows(tokenizer, config.corpus, config.seq_len, config.encoding)
    needed = config.batch_size * accelerator.num_processes
    if len(train) < needed:
        raise ValueError(f"the corpus gives {len(train)} training windows of {config.seq_len} tokens; one step needs {needed}")
    val = spread(val, config.eval_windows)
    out = record(config, "distill")

    trainable = set_trainable(student, config.trainable)
    if config.gradient_checkpointing:
        set_checkpointing(student, True)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(student, config), weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    teacher_model = teacher.model.to(accelerator.device).eval().requires_grad_(False)

    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "state"))
        start = json.loads((resume_from / "trainer.json").read_text())["step"]
        accelerator.print(f"resuming from {resume_from} at step {start}")

    log_path = run.log
    history: list[dict] = []
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in accelerator.unwrap_model(student).parameters())
    trained = {"trained": n_train, "total": n_all, "percent": 100 * n_train / n_all}
    if accelerator.is_main_process:
        kept = [ln for ln in (log_path.read_text().splitlines() if log_path.exists() and start else []) if json.loads(ln)["step"] <= start]
        log_path.write_text("".join(ln + "\n" for ln in kept))
        history = [json.loads(ln) for ln in kept if "val_ppl" in json.loads(ln)]
        print(f"training {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.1f}%, --trainable {config.trainable})")

    def log(entry: dict) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    if start == 0 and not history:
        entry = {"step": 0, "val_ppl": validation_perplexity(accelerator, student, val)}
        history.append(entry)
        log(entry)
    tokens_per_step = config.batch_size * config.grad_accum * accelerator.num_processes * config.seq_len
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="distill",
               disable=not accelerator.is_local_main_process)
    completed, updating = start, False
    try:
        for step in bar:
            started = time.perf_counter()
            sums: dict[str, float] = {}
            for micro in range(config.grad_accum):
                ids = train[batch_indices(step, micro, config, len(train), accelerator.process_index,
                                          accelerator.num_processes)].to(accelerator.device)
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(student), accelerator.autocast():
                    terms = distillation_losses(student, teacher_model, ids, config)
                    bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(terms["loss"])), device=accelerator.device), "sum")
                    if bad.item() > 0:
                        kept = latest_checkpoint(out)
                        raise TrainingError(f"non-finite loss at step {step + 1}; stopped. Last good checkpoint: {kept or 'none'}")
                    accelerator.backward(terms["loss"] / config.grad_accum)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / config.grad_accum
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm > 0 else None
            updating = True  # an interrupt inside the update leaves a state that belongs to no step: not saved
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed, updating = step + 1, False
            seconds = time.perf_counter() - started
            entry = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0],
                     "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": tokens_per_step / seconds}
            log(entry)
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()} | {"tok/s": f"{entry['tokens_per_s']:.0f}"})
            done = step + 1 == config.steps
            if (config.eval_every and (step + 1) % config.eval_every == 0) or done:
                entry = {"step": step + 1, "val_ppl": validation_perplexity(accelerator, student, val)}
                history.append(entry)
                log(entry)
                bar.write(f"step {step + 1}: validation perplexity {entry['val_ppl']:.2f}")
            if (config.save_every and (step + 1) % config.save_every == 0) or done:
                save_checkpoint(accelerator, student, tokenizer, out, step + 1, config.keep_checkpoints, identity)
    except KeyboardInterrupt:
        if not updating and completed > latest_step(out):
            save_checkpoint(accelerator, student, tokenizer, out, completed, config.keep_checkpoints, identity)
            accelerator.print(f"interrupted: saved step {completed}; continue with --resume auto")
        raise
    bar.close()

    final = run.distilled
    state_dict = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        if config.gradient_checkpointing:
            set_checkpointing(model, False)
        model.save_pretrained(final, state_dict=state_dict)
        tokenizer.save_pretrained(final)
        if (student_dir / "sharing.json").is_file():  # what the student is travels with it
            shutil.copy(student_dir / "sharing.json", final / "sharing.json")
        run.distill_summary.write_text(
            json.dumps({"config": asdict(config), "parameters": trained, "validation": history}, indent=2)
        )
        print(f"wrote the distilled student to {final}")
    accelerator.wait_for_everyone()
    return {"validation": history, "student": final, "parameters": trained, "model": accelerator.unwrap_model(student)}
