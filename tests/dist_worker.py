"""Launched by test_distill under torchrun: distil on this rank, then gather every rank's checksum of the weights it
holds in memory (not a file rank 0 wrote), and of the distilled checkpoint on disk."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from echoatt.run.config import DistillConfig
from echoatt.training.distill import distill


def checksum(model: torch.nn.Module) -> float:
    return sum(float(p.double().sum()) for p in model.parameters())


out = Path(sys.argv[1])
config = DistillConfig(teacher=sys.argv[2], corpus=sys.argv[3], seq_len=32, out=str(out), steps=3, batch_size=1,
                       grad_accum=1, lr=1e-2, warmup_steps=1, eval_windows=2, save_every=0, device="cpu", threads=1)
result = distill(config)
mine = {"memory": checksum(result["model"]), "disk": checksum(AutoModelForCausalLM.from_pretrained(result["student"]))}
every = [None] * dist.get_world_size()
dist.all_gather_object(every, mine)
if dist.get_rank() == 0:
    (out / "checksums.json").write_text(json.dumps(every))
dist.destroy_process_group()  # as `echoatt.cli` does: a live gloo group at exit can abort the process
