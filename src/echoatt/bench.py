"""Speed and size of teacher vs student, measured side by side in one process.

Every figure times the same work on four candidates — teacher on SDPA, teacher on eager, student on its fused path
(SDPA) and on its reuse path (eager) — interleaved (the order rotates each repeat), after a warm-up, with the
thread count pinned. Each candidate's median and min/max are reported with two ratios, each beside its analytic
bound (`echoatt.cost_model`):
- headline: teacher on SDPA (its fastest backend) / student on SDPA;
- eager vs eager (the papers' likely setting), never the headline.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from echoatt.config import BenchConfig
from echoatt.cost_model import Bound, bound
from echoatt.losses import KDLoss
from echoatt.modeling import CACHE_KWARG, output_cache
from echoatt.student import kv_cache_bytes_per_token, parameter_count

CANDIDATES = ("teacher_sdpa", "teacher_eager", "student_sdpa", "student_eager")
ARCHS = {  # `bench --arch NAME`: the shapes of the models users bring, as their config.json files give them
    "tinyllama": {  # TinyLlama-1.1B (the papers' setting): 22 layers, GQA 32/4
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
    },
    "qwen3-0.6b": {  # head_dim 128 with hidden 1024 and 16 heads; q/k norms
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "qwen2.5-0.5b": {  # q/k/v biases, GQA 14/2
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "llama-3.2-1b": {  # llama3 rotary scaling
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    },
    "mistral-7b": {  # Mistral-7B-v0.3: no sliding window
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


def arch_config(spec: str):
    """The architecture `bench --arch` measures: a name in `ARCHS` or a config.json of a supported family, as that
    family's config class (anything else refused by name, never silently replaced by LLaMA's defaults)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from echoatt.rundir import first_line
    from echoatt.teacher import check_supported

    if spec in ARCHS:
        data = ARCHS[spec]
    else:
        try:
            data = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--arch {spec}: not one of {', '.join(ARCHS)} nor a readable config.json "
                             f"({first_line(err)})") from err
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError(f"--arch {spec}: no model_type in it, not a transformers config.json")
    check_supported(SimpleNamespace(**data))
    fields = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(data["model_type"], **fields)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _with_impl(model, impl: str):
    model.config._attn_implementation = impl
    return model


def measure(work: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict:
    """Interleaved timing: each repeat runs every candidate once, starting from a different one."""
    names = list(work)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            seconds = _timed(work[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v} for n, v in times.items()}


def _figure(name: str, setting: dict, timings: dict, per: float, bounds: dict[str, Bound]) -> dict:
    """One figure: timings, throughput (`per` units of work per call), both ratios beside their bounds."""
    med = {n: t["median"] for n, t in timings.items()}
    ratios = {
        "headline": med["teacher_sdpa"] / med["student_sdpa"],
        "eager_vs_eager": med["teacher_eager"] / med["student_eager"],
    }
    return {
        "figure": name,
        "setting": setting,
        "timings_s": timings,
        "throughput_per_s": {n: per / m for n, m in med.items()},
        "ratios": {
            k: {"ratio": v, "bound": bounds[k].value, "bound_flops": bounds[k].flops, "bound_bytes": bounds[k].bytes,
                "regime": bounds[k].regime, "achieved_over_bound": v / bounds[k].value}
            for k, v in ratios.items()
        },
    }


def _bounds(teacher, student, dtype_bytes: int, **kw) -> dict[str, Bound]:
    return {
        "headline": bound(teacher.config, student.config, teacher_eager=False, student_eager=False,
                          dtype_bytes=dtype_bytes, **kw),
        "eager_vs_eager": bound(teacher.config, student.config, teacher_eager=True, student_eager=True,
                                dtype_bytes=dtype_bytes, **kw),
    }


def _models(teacher, student) -> dict[str, torch.nn.Module]:
    """The four candidates; teacher and student are each shared by their two backends (switched before a call)."""
    return {"teacher_sdpa": teacher, "teacher_eager": teacher, "student_sdpa": student, "student_eager": student}


def _impl(name: str) -> str:
    return name.rsplit("_", 1)[1]


@torch.no_grad()
def prefill_figure(teacher, student, length: int, config: BenchConfig, device, dtype_bytes: int) -> dict:
    ids = torch.randint(0, teacher.config.vocab_size, (1, length), device=device)
    work = {
        n: (lambda m=m, n=n: _with_impl(m, _impl(n))(input_ids=ids, use_cache=False, logits_to_keep=1))
        for n, m in _models(teacher, student).items()
    }
    timings = measure(work, device, config.repeats, config.warmup)
    return _figure("prefill", {"batch": 1, "tokens": length}, timings, length,
                   _bounds(teacher, student, dtype_bytes, B=1, T=length, P=0, logits=1))


@torch.no_grad()
def decode_figure(teacher, student, batch: int, context: int, config: BenchConfig, device, dtype_bytes: int) -> dict:
    """tokens/s of `decode_steps` single-token steps after a `context`-token prompt (prefill untimed)."""
    ids = torch.randint(0, teacher.config.vocab_size, (batch, context), device=device)
    step_ids = torch.randint(0, teacher.config.vocab_size, (batch, 1), device=device)
    caches = {}
    for name, model in _models(teacher, student).items():
        caches[name] = output_cache(_with_impl(model, _impl(name))(input_ids=ids, use_cache=True, logits_to_keep=1))

    def steps(model, impl: str, cache) -> None:
        _with_impl(model, impl)
        for _ in range(config.decode_steps):
            model(input_ids=step_ids, use_cache=True, **{CACHE_KWARG: cache})
        cache.crop(-config.decode_steps)  # back to the prompt for the next repeat: a slice, no copy

    work = {n: (lambda m=m, n=n: steps(m, _impl(n), caches[n])) for n, m in _models(teacher, student).items()}
    timings = measure(work, device, config.repeats, config.warmup)
    cache_bytes = {n: sum(x.nbytes for layer in c.layers for x in (layer.keys, layer.values)) for n, c in caches.items()}
    figure = _figure("decode", {"batch": batch, "context": context, "steps": config.decode_steps}, timings,
                     batch * config.decode_steps,
                     _bounds(teacher, student, dtype_bytes, B=batch, T=1, P=context + config.decode_steps // 2))
    figure["kv_cache_bytes_after_prompt"] = cache_bytes
    return figure


def saved_activation_bytes(step: Callable[[], torch.Tensor], *models: torch.nn.Module) -> int:
    """Bytes autograd keeps for backward during `step` (which returns the loss), each storage counted once and the
    models' weights left out: the training memory that depends on the model, independent of device and allocator."""
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(storages.values())


def train_figure(teacher, student, config: BenchConfig, device, dtype_bytes: int, distill: bool) -> dict:
    """One forward+backward (or distillation step: frozen-teacher forward + student forward/backward with the KD
    losses) at `train_len` tokens. The teacher's own row trains the teacher in the student's place."""
    ids = torch.randint(0, teacher.config.vocab_size, (config.train_batch, config.train_len), device=device)
    kd_loss = KDLoss()  # distillation's default objective

    def loss(model, impl: str) -> torch.Tensor:
        _with_impl(model, impl)
        _with_impl(teacher, impl)
        if distill:
            return kd_loss(model, teacher, ids)["loss"]
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def step(model, impl: str) -> None:
        loss(model, impl).backward()
        model.zero_grad(set_to_none=True)  # frees the gradients: only one model's exist at a time

    for model in (teacher, student):
        model.requires_grad_(True).train()
    models = _models(teacher, student)
    work = {n: (lambda m=m, n=n: step(m, _impl(n))) for n, m in models.items()}
    try:
        timings = measure(work, device, config.repeats, config.warmup)
        memory = {n: {"saved_activation_bytes": saved_activation_bytes(lambda m=m, n=n: loss(m, _impl(n)),
                                                                       teacher, student)}
                  for n, m in models.items()}
        if device.type == "cuda":
            for n, fn in work.items():
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                memory[n]["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    finally:
        for model in (teacher, student):
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False).eval()
    tokens = config.train_batch * config.train_len
    figure = _figure("distill_step" if distill else "train_step",
                     {"batch": config.train_batch, "tokens": config.train_len}, timings, tokens,
                     _bounds(teacher, student, dtype_bytes, B=config.train_batch, T=config.train_len, P=0, train=True,
                             with_teacher=distill))
    figure["memory"] = memory
    return figure


def run_bench(teacher, student, config: BenchConfig, device: torch.device) -> dict:
    """All figures for one teacher/student pair; returns the JSON-able result."""
    dtype = next(teacher.parameters()).dtype
    dtype_bytes = torch.finfo(dtype).bits // 8
    figures = []
    for length in config.prefill_lengths():
        figures.append(prefill_figure(teacher, student, length, config, device, dtype_bytes))
    for batch, context in config.decode_settings():
        figures.append(decode_figure(teacher, student, batch, context, config, device, dtype_bytes))
    if config.train_len:
        figures.append(train_figure(teacher, student, config, device, dtype_bytes, distill=False))
        figures.append(train_figure(teacher, student, config, device, dtype_bytes, distill=True))
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "config": asdict(config),
        "student": getattr(student.config, "follower_type", "copy"),
        "reuse_crossover": getattr(student.config, "reuse_crossover", None),
        "size": {
            "parameters": {"teacher": parameter_count(teacher), "student": parameter_count(student)},
            "kv_cache_bytes_per_token": {
                "teacher": kv_cache_bytes_per_token(teacher.config, dtype_bytes),
                "student": kv_cache_bytes_per_token(student.config, dtype_bytes),
            },
        },
        "figures": figures,
    }


def markdown(result: dict) -> str:
    """The speed table: medians, both ratios and their bounds, achieved/bound."""
    lines = [
        (f"Device: {result['device']}, {result['threads']} threads, {result['dtype']}, torch {result['torch']}. "
        "Medians of interleaved repeats; bound = analytic teacher cost / student cost (FLOPs for prefill and "
        f"training, bytes for decode). Student: {result.get('student', 'copy')} followers; on SDPA it takes the reuse "
        f"path for calls of at most {result.get('reuse_crossover', '?')} new tokens (decode), the fused path above."),
        "",
        ("| figure | setting | teacher sdpa | teacher eager | student sdpa | student eager | ratio (vs teacher sdpa) "
        "| bound | achieved/bound | eager/eager ratio | bound | achieved/bound |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in result["figures"]:
        setting = ", ".join(f"{k} {v}" for k, v in f["setting"].items())
        t = [f"{f['timings_s'][c]['median'] * 1000:.1f} ms" for c in CANDIDATES]
        h, e = f["ratios"]["headline"], f["ratios"]["eager_vs_eager"]
        lines.append(
            f"| {f['figure']} | {setting} | " + " | ".join(t)
            + f" | {h['ratio']:.3f}× | {h['bound']:.3f}× | {h['achieved_over_bound']:.2f} "
            f"| {e['ratio']:.3f}× | {e['bound']:.3f}× | {e['achieved_over_bound']:.2f} |"
        )
    for f in result["figures"]:
        if "memory" in f:
            mem = f["memory"]
            cells = ", ".join(
                f"{c.replace('_', ' ')} {mem[c]['saved_activation_bytes'] / 2**20:.1f} MiB"
                + (f" (peak {mem[c]['peak_cuda_bytes'] / 2**20:.0f} MiB)" if "peak_cuda_bytes" in mem[c] else "")
                for c in CANDIDATES
            )
            lines += ["", f"{f['figure']}: activations kept for backward: {cells}."]
    size = result["size"]
    p, kv = size["parameters"], size["kv_cache_bytes_per_token"]
    lines += [
        "",
        (f"Parameters: teacher {p['teacher']:,}, student {p['student']:,} "
        f"(−{100 * (1 - p['student'] / p['teacher']):.2f}%). KV cache per token: teacher {kv['teacher']:,} B, "
        f"student {kv['student']:,} B (×{kv['student'] / kv['teacher']:.3f})."),
    ]
    return "\n".join(lines)


def save(result: dict, paths: tuple[Path, Path]) -> str:
    """The result as JSON and as its Markdown table; returns the table."""
    table = markdown(result)
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(table + "\n")
    return table
