"""Training checkpoints: written atomically, found, and resumed — never those of another student.

A checkpoint is written to `step-N.partial` and renamed when complete, then the `latest` pointer is replaced
atomically, so a kill mid-write never leaves a broken "latest". Each holds a loadable student, accelerate's state
(model, optimizer, scheduler, RNG) and `trainer.json`: the step and the identity of the student it trains.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from echoatt.common import TrainingError, disk_full, replaced_atomically
from echoatt.noise import silence
from echoatt.run.rundir import Checkpoint, RunDir, describe, same_student


def latest_step(run: RunDir) -> int:
    latest = run.latest()
    return latest.read()["step"] if latest else 0


def checkpoint_identities(run: RunDir) -> list[dict | None]:
    """The student each checkpoint in the run folder was trained from (None: unlabelled, from before labels)."""
    return [c.read().get("student") for c in run.finished_checkpoints() if c.complete()]


def resume_point(run: RunDir, resume: str, identity: dict) -> Checkpoint | None:
    """The checkpoint to continue from (`--resume`): none, the latest, or one named; never one of another student."""
    if resume == "never":
        return None
    found = run.latest() if resume == "auto" else Checkpoint(Path(resume))
    if found is None:
        return None
    if not found.complete():
        raise FileNotFoundError(f"no checkpoint at {found.path}")
    saved = found.read().get("student")
    if not same_student(saved, identity):
        was = describe(saved) if saved else "an unlabelled student"
        raise TrainingError(f"checkpoint {found.path} was trained from another student ({was}), not this one "
                            f"({describe(identity)}); use another --out, `echoatt share --overwrite`, "
                            "or --resume never")
    return found


def load_checkpoint(accelerator: Accelerator, checkpoint: Checkpoint) -> int:
    """Restore model, optimizer, scheduler and RNG state; return the step it was taken after."""
    accelerator.load_state(str(checkpoint.state))
    return checkpoint.read()["step"]


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's weights on disk (tied weights once, as `parameters()` yields them)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_bytes(student: torch.nn.Module) -> int:
    """What one checkpoint takes on disk: the weights twice (accelerate's state and the loadable student) and AdamW's
    two moments of each trained weight."""
    moments = sum(2 * p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    return 2 * weight_bytes(student) + moments


def save_checkpoint(
    accelerator: Accelerator, student, tokenizer, run: RunDir, step: int, keep: int, identity: dict
) -> Path:
    """Write step-N atomically (partial folder, rename, then the `latest` pointer); prune all but `keep`."""
    # Tied embeddings (lm_head = embed_tokens) are saved once and tied again on load, as the resume tests check.
    silence("accelerate.utils.other", "Removed shared tensor {'lm_head.weight'} while saving")
    final, partial = run.checkpoint(step), run.checkpoint(step, partial=True)
    if accelerator.is_main_process:
        shutil.rmtree(partial.path, ignore_errors=True)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial.state))
        state_dict = accelerator.get_state_dict(student)
        if accelerator.is_main_process:
            accelerator.unwrap_model(student).save_pretrained(partial.student, state_dict=state_dict)
            tokenizer.save_pretrained(partial.student)
            partial.trainer.write_text(json.dumps({"step": step, "student": identity}))
            shutil.rmtree(final.path, ignore_errors=True)
            partial.path.replace(final.path)
            with replaced_atomically(run.latest_pointer) as tmp:
                tmp.write_text(final.path.name)
            for old in run.finished_checkpoints()[:-keep]:
                shutil.rmtree(old.path, ignore_errors=True)
    except (OSError, SafetensorError) as err:  # safetensors reports its own I/O errors (a full disk) as SafetensorError
        if accelerator.is_main_process:
            shutil.rmtree(partial.path, ignore_errors=True)
        kept = run.latest()
        reason = "disk full" if disk_full(err) else str(err)
        where = kept.path if kept else "none"
        raise TrainingError(f"could not write the checkpoint at step {step} ({reason}); kept: {where}") from err
    accelerator.wait_for_everyone()
    return final.path
