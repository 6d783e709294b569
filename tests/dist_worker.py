"""Launched by test_distill under torchrun: distil on this rank, then record a checksum of the trained weights."""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from echoatt.config import DistillConfig
from echoatt.distill import distill

out = Path(sys.argv[1])
config = DistillConfig(teacher=sys.argv[2], corpus=sys.argv[3], seq_len=32, out=str(out), steps=3, batch_size=1,
                       grad_accum=1, lr=1e-2, warmup_steps=1, eval_windows=2, save_every=0, device="cpu", threads=1)
result = distill(config)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
# Every rank reloads the final checkpoint (written by rank 0) and sums its own in-memory copy of the weights too.
model = AutoModelForCausalLM.from_pretrained(result["student"])
checksum = sum(float(p.double().sum()) for p in model.parameters())
(out / f"rank{rank}_of_{world}.txt").write_text(repr(checksum))
