"""Which precision the long work runs in: bf16 autocast where the device multiplies bf16 natively, fp32 elsewhere.

bf16 autocast keeps fp32 master weights and optimizer state; only the matmuls' inputs are bf16 (the losses' softmax
and KL stay fp32, `losses.py`). On a GPU and on CPUs with AMX (Intel Sapphire Rapids and later) or AVX512-BF16 (Intel
Cooper Lake, AMD Zen 4 and later) those matmuls run several times faster than fp32; on CPUs without native bf16
(AVX2-only: AMD Zen 2/3, older Xeons) the same autocast is emulated and far slower than fp32, so `auto` follows the
processor and `yes` there is refused. The work it applies to: `distill`'s step, `share`'s measurement of candidates
and the teacher-cache fill (inside the step); `eval`'s scores stay fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

SETTINGS = ("auto", "yes", "no")
NATIVE_CPU_FEATURES = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}  # torch.cpu.get_capabilities() key -> name


def cpu_bf16_feature() -> str | None:
    """The CPU feature that multiplies bf16 natively (AMX before AVX512-BF16), or None. Read from
    `torch.cpu.get_capabilities()` (cpuinfo's flags as torch's kernels see them; tests/test_precision.py fails if
    its keys go)."""
    capabilities = torch.cpu.get_capabilities()
    return next((name for key, name in NATIVE_CPU_FEATURES.items() if capabilities.get(key)), None)


def cpu_name() -> str:
    return str(torch.cpu.get_capabilities().get("cpu_name") or "this CPU")


@dataclass(frozen=True)
class Precision:
    """What a command runs its long work in, and why (for its log, summary and report)."""

    bf16: bool
    why: str

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def line(self) -> str:
        return f"precision: {self.name} ({self.why})"

    def autocast(self, device: str | torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast on `device` where chosen, else nothing."""
        kind = torch.device(device).type
        return torch.autocast(kind, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def as_dict(self) -> dict:
        return {"name": self.name, "bf16": self.bf16, "why": self.why}


FP32 = Precision(False, "fp32")


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """Whether `device` (`auto`: CUDA where there is one) multiplies bf16 natively, and the reason in words."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if device.type == "cuda":
        yes = torch.cuda.is_bf16_supported()
        return yes, f"{torch.cuda.get_device_name(device)} {'has' if yes else 'has no'} native bf16"
    feature = cpu_bf16_feature()
    if feature:
        return True, f"{cpu_name()} multiplies bf16 natively ({feature})"
    return False, f"{cpu_name()} has neither AMX nor AVX512-BF16: bf16 there is emulated, slower than fp32"


def resolve(setting: str, device: str | torch.device) -> Precision:
    """The precision `--bf16 setting` means on `device`; `yes` where bf16 is not native is refused (ValueError, one
    line, before any model loads)."""
    if setting not in SETTINGS:
        raise ValueError(f"--bf16 must be one of {', '.join(SETTINGS)} (got {setting!r})")
    if setting == "no":
        return Precision(False, "--bf16 no")
    native, why = native_bf16(device)
    if setting == "yes" and not native:
        raise ValueError(f"--bf16 yes: {why}; use --bf16 auto or no")
    return Precision(native, why if setting == "auto" else f"--bf16 yes; {why}")


