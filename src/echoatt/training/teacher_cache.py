"""The frozen teacher's outputs on training windows, computed once and kept on disk (offline teacher outputs, as
torchtune's and Liger-Kernel's users ask for): the hidden states the distillation matches and either the final
hidden state — the exact logits are that times the teacher's output embeddings, one matmul the fused loss makes
anyway — or, with k > 0, the top-k next-token log-probabilities at the distillation's temperature (for a teacher
whose output layer should not be held: the soft loss then sees the rest of the vocabulary as one bucket). Every
student distilled on the same windows — the trade curve distils many — then trains without running the teacher's
layers.

A window's file is named by its tokens and kept under a folder named by what the outputs depend on: the teacher
(`Teacher.stamp`), k (and for k > 0 the temperature), the teacher's dtype and device type, and whether bf16
autocast computes them. A run fills the cache as it
reads windows, so an interrupted run keeps what it wrote and a resumed or later one reads it; each file is written
atomically, so processes share it. Matched hidden states are kept in bfloat16 (half the disk of float32; the hidden
loss is a scale-normalised distance), the final one in the teacher's dtype.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from echoatt.common import cache_dir, replaced_atomically
from echoatt.inputs.corpus import fingerprint
from echoatt.training.losses import NO_LOGITS, TeacherOutputs, matched_hidden

HIDDEN_DTYPE = torch.bfloat16
LOGIT_ROWS = 512  # positions whose full-vocabulary logits exist at once while the top k is taken


def window_file(folder: Path, window: torch.Tensor) -> Path:
    """Where a cache in `folder` keeps what it knows of one window (T,): a file named by the window's tokens."""
    return folder / f"{hashlib.sha256(window.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:24]}.safetensors"


class TeacherCache:
    """Top-k log-probabilities and matched hidden states of one teacher, per window, in `folder`."""

    def __init__(self, root: str | Path, stamp: str, top_k: int, temperature: float, teacher: torch.nn.Module,
                 autocast: bool = False):
        weight = next(teacher.parameters())
        self.top_k, self.temperature, self.dtype = top_k, temperature, weight.dtype
        self.folder = Path(root) / fingerprint(stamp, top_k, float(temperature) if top_k else None, weight.dtype,
                                               weight.device.type, HIDDEN_DTYPE, *(["bf16-autocast"] if autocast else []))
        self.read = self.written = 0

    @classmethod
    def where(cls, setting: str) -> Path:
        """`--teacher-cache`'s folder: `auto` is the echoatt cache's."""
        return cache_dir() / "teacher-outputs" if setting == "auto" else Path(setting).expanduser()

    @torch.no_grad()
    def outputs(self, teacher: torch.nn.Module, ids: torch.Tensor) -> TeacherOutputs:
        """The teacher's outputs for windows `ids` (B, T): read where kept, else computed in one batch and kept."""
        paths = [window_file(self.folder, w) for w in ids]
        have = {i: load_file(p) for i, p in enumerate(paths) if p.is_file()}
        missing = [i for i in range(len(ids)) if i not in have]
        if missing:
            fresh = self.compute(teacher, ids[missing])
            self.folder.mkdir(parents=True, exist_ok=True)
            for row, i in enumerate(missing):
                have[i] = {k: v[row].contiguous() for k, v in fresh.items()}
                with replaced_atomically(paths[i]) as tmp:
                    save_file(have[i], str(tmp))
        self.read, self.written = self.read + len(ids) - len(missing), self.written + len(missing)
        device = ids.device
        stack = lambda key: torch.stack([have[i][key] for i in range(len(ids))]).to(device)
        hidden = list(stack("hidden").transpose(0, 1))  # L-1 of (B, T, C)
        if not self.top_k:
            return TeacherOutputs(hidden, stack("final"))
        return TeacherOutputs(hidden, None, stack("topk_ids").long(), stack("topk_logprobs"), self.temperature)

    def compute(self, teacher: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch of windows (B, T) through the teacher, on the CPU: matched hidden states (B, L-1, T, C) in
        `HIDDEN_DTYPE` and the final hidden states (B, T, C) — or, for k > 0, top-k ids (B, T, k) int32 and their
        log-probabilities at the temperature (B, T, k) float32."""
        out = teacher(input_ids=ids, use_cache=False, output_hidden_states=True,
                      logits_to_keep=NO_LOGITS.to(ids.device))
        kept = {"hidden": torch.stack(matched_hidden(out.hidden_states), 1).to(HIDDEN_DTYPE).cpu()}
        if not self.top_k:
            return kept | {"final": out.hidden_states[-1].cpu()}
        final = out.hidden_states[-1].flatten(0, 1)  # (B*T, C)
        head = teacher.get_output_embeddings()
        ids_k, logp_k = [], []
        for i in range(0, len(final), LOGIT_ROWS):
            log_p = torch.log_softmax(head(final[i : i + LOGIT_ROWS]).float() / self.temperature, -1)  # (rows, V)
            top = log_p.topk(min(self.top_k, log_p.shape[-1]), dim=-1)  # a k above the vocabulary: all of it
            ids_k.append(top.indices.to(torch.int32))
            logp_k.append(top.values)
        shape = (*ids.shape, ids_k[0].shape[-1])
        return kept | {"topk_ids": torch.cat(ids_k).view(shape).cpu(),
                       "topk_logprobs": torch.cat(logp_k).view(shape).cpu()}

    def window_bytes(self, config, seq_len: int) -> int:
        """What one window of `seq_len` tokens takes on disk for a teacher of `config`."""
        width = config.hidden_size
        hidden = (config.num_hidden_layers - 1) * seq_len * width * HIDDEN_DTYPE.itemsize
        return hidden + seq_len * (self.top_k * 8 if self.top_k else width * self.dtype.itemsize)

    def room(self, config, seq_len: int, windows: int) -> tuple[int, str]:
        """What a run reading `windows` windows may still add to the cache, in bytes (the windows already kept count
        as read), and a line saying what the cache takes."""
        each = self.window_bytes(config, seq_len)
        have = sum(1 for _ in self.folder.glob("*.safetensors")) if self.folder.is_dir() else 0
        return max(0, windows - have) * each, (f"teacher outputs cached in {self.folder}: {windows} windows x "
                                               f"{each / 2**20:.0f} MiB = {windows * each / 2**30:.1f} GiB "
                                               f"({have} there already)")

    def summary(self) -> str:
        return (f"teacher outputs: {self.read} windows read from the cache, {self.written} computed and kept "
                f"({self.folder})")
