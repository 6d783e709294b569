"""Speed and size of teacher vs student, measured side by side in one process.

Every figure times the same work on four candidates — teacher on SDPA, teacher on eager, student on its fused path
(SDPA) and on its reuse path (eager) — interleaved (the order rotates each repeat), after a warm-up, with the
thread count pinned. Each candidate's median and min/max are reported with two ratios, each beside its analytic
bound (`echoatt.planning.cost_model`):
- headline: teacher on SDPA (its fastest backend) / student on SDPA;
- eager vs eager (the papers' likely setting), never the headline.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from echoatt.building.student import kv_cache_bytes_per_token, parameter_count
from echoatt.model.modeling_echoatt import CACHE_KWARG, output_cache
from echoatt.planning.cost_model import Bound, bound, forward_cost
from echoatt.training.losses import KDLoss, fused_output_kd, output_weight
from echoatt.training.memory import PeakMemory, free_memory

if TYPE_CHECKING:
    from echoatt.run.config import BenchConfig

CANDIDATES = ("teacher_sdpa", "teacher_eager", "student_sdpa", "student_eager")
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


@contextlib.contextmanager
def benchmarked(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """`model` as the bench runs it — on `device` in `dtype`, in eval mode, frozen — without changing the caller's:
    where it is elsewhere or in another dtype, a converted copy (each tensor converted once, tied weights kept tied;
    never a full copy in the old dtype); its attention backend, mode and trainable flags restored afterwards (the
    bench switches backends by the config). A teacher shared by `run`, `compare` or `echoatt.compress` stays as it
    was: a bf16 cast would otherwise follow it into every later step, and a cast back would lose its precision."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        flags = [p.requires_grad for p in model.parameters()]
        impl, training = model.config._attn_implementation, model.training
        try:
            yield model.eval().requires_grad_(False)
        finally:
            model.config._attn_implementation = impl
            model.train(training)
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)
        return

    def converted(t: torch.Tensor) -> torch.Tensor:
        new = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else None, copy=True)
        return torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new

    memo = {id(t): converted(t) for t in tensors}  # deepcopy takes these instead of copying the originals
    clone = copy.deepcopy(model, memo)
    del memo
    yield clone.eval()


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


RATIOS = {"headline": ("teacher_sdpa", "student_sdpa"), "eager_vs_eager": ("teacher_eager", "student_eager")}


def _figure(name: str, setting: dict, timings: dict, per: float, bounds: dict[str, Bound],
            skipped: dict[str, str] | None = None) -> dict:
    """One figure: timings, throughput (`per` units of work per call), each ratio whose two candidates ran beside its
    bound; `skipped`: the candidates that could not run, and why."""
    med = {n: t["median"] for n, t in timings.items()}
    ratios = {k: med[t] / med[s] for k, (t, s) in RATIOS.items() if t in med and s in med}
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
        "skipped": skipped or {},
    }


def out_of_memory(err: BaseException) -> bool:
    """Whether an error is the device (or the host) running out of memory."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def fitting(work: dict[str, Callable[[], None]], device: torch.device) -> tuple[dict, dict[str, str]]:
    """Each candidate run once, untimed: the ones that fit, and why each other one did not. Only the eager candidates
    may be left out (they materialise B x H x T x T attention); the headline's running out of memory is raised."""
    kept, skipped = {}, {}
    for name, fn in work.items():
        try:
            fn()
            kept[name] = fn
        except RuntimeError as err:
            if not out_of_memory(err) or name in RATIOS["headline"]:
                raise
            skipped[name] = "out of memory"
        free_memory(device)
    return kept, skipped


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
    work, skipped = fitting(work, device)
    timings = measure(work, device, config.repeats, config.warmup)
    return _figure("prefill", {"batch": 1, "tokens": length}, timings, length,
                   _bounds(teacher, student, dtype_bytes, B=1, T=length, P=0, logits=1), skipped)


def prompt_cache(model, ids: torch.Tensor, max_length: int, static: bool):
    """The KV cache of a prompt (B, T), prefilled on SDPA whatever backend decodes from it (the cache does not depend
    on the kernel, and an eager prefill would materialise B x H x T x T attention); static: preallocated to
    `max_length` tokens."""
    from transformers import StaticCache

    kw = {CACHE_KWARG: StaticCache(config=model.config, max_cache_len=max_length)} if static else {}
    return output_cache(_with_impl(model, "sdpa")(input_ids=ids, use_cache=True, logits_to_keep=1, **kw))


def rewind(cache, tokens: int) -> None:
    """Forget the last `tokens` tokens of a KV cache, in place: `crop` where a layer has it (dynamic layers; static
    ones from transformers 5.24), else a static layer's token counter stepped back (before 5.24 `StaticLayer` has no
    `crop`; the next `update` overwrites the stale slots, and the counter keeps the static address CUDA graphs
    captured)."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-tokens)
        elif hasattr(layer, "cumulative_length"):
            layer.cumulative_length.sub_(tokens)
        else:
            raise TypeError(f"cannot rewind a {type(layer).__name__} (no crop, no token counter)")


def memory_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes a second a plain copy moves (read and write), best of five: the memory bandwidth the device reaches."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * nbytes / best


@torch.no_grad()
def decode_figure(teacher, student, batch: int, context: int, config: BenchConfig, device, dtype_bytes: int,
                  bandwidth: float | None = None) -> dict:
    """tokens/s of `decode_steps` single-token steps after a `context`-token prompt (prefill untimed), each model's
    ms per step beside its bandwidth limit: the bytes one step must read (weights, KV cache) at `bandwidth`."""
    ids = torch.randint(0, teacher.config.vocab_size, (batch, context), device=device)
    step_ids = torch.randint(0, teacher.config.vocab_size, (batch, 1), device=device)
    static = config.decode_cache == "static"
    caches = {name: prompt_cache(model, ids, context + config.decode_steps, static)
              for name, model in (("teacher", teacher), ("student", student))}  # one per model, both backends
    del ids
    compiled = {}

    def step_fn(model, impl: str):
        if not config.compile:
            return model
        if (id(model), impl) not in compiled:  # a compiled graph per backend: the backend is read at trace time
            mode = "reduce-overhead" if device.type == "cuda" else None
            compiled[id(model), impl] = torch.compile(model, mode=mode, dynamic=False)
        return compiled[id(model), impl]

    def steps(model, impl: str, cache) -> None:
        forward = step_fn(_with_impl(model, impl), impl)
        for _ in range(config.decode_steps):
            forward(input_ids=step_ids, use_cache=True, **{CACHE_KWARG: cache})
        rewind(cache, config.decode_steps)  # back to the prompt for the next repeat: no copy

    models = _models(teacher, student)
    if config.compile:  # a compiled graph per candidate takes long to build: the headline's two only
        models = {n: m for n, m in models.items() if n in RATIOS["headline"]}
    work = {n: (lambda m=m, n=n: steps(m, _impl(n), caches[n.split("_")[0]])) for n, m in models.items()}
    work, skipped = fitting(work, device)
    skipped.update({n: "not compiled" for n in CANDIDATES if n not in models})
    timings = measure(work, device, config.repeats, config.warmup)
    P = context + config.decode_steps // 2
    figure = _figure("decode", {"batch": batch, "context": context, "steps": config.decode_steps,
                                "cache": config.decode_cache, "compiled": config.compile}, timings,
                     batch * config.decode_steps, _bounds(teacher, student, dtype_bytes, B=batch, T=1, P=P), skipped)
    figure["kv_cache_bytes_after_prompt"] = {
        name: sum(x[..., :context, :].nbytes for layer in c.layers for x in (layer.keys, layer.values))
        for name, c in caches.items()}
    figure["ms_per_step"] = {n: t["median"] / config.decode_steps * 1000 for n, t in timings.items()}
    if bandwidth:
        limit = {name: forward_cost(m.config, batch, 1, P, False, dtype_bytes).bytes / bandwidth * 1000
                 for name, m in (("teacher", teacher), ("student", student))}
        figure["bandwidth_limit_ms"] = limit
        figure["over_bandwidth_limit"] = {n: ms / limit[n.split("_")[0]] for n, ms in figure["ms_per_step"].items()}
    return figure


def kd_output_bytes_per_entry(student, teacher, tokens: int, device: torch.device) -> float | None:
    """Peak bytes per (token x vocabulary) entry that distillation's output terms (`losses.fused_output_kd`, forward
    and backward) add at `tokens` positions, on random final hidden states: the losses' own memory, which grows
    with tokens x vocabulary (the full-logits path's ~12-21 bytes an entry OOMed a GPU at 4 x 1024 tokens)."""
    weights = output_weight(student), output_weight(teacher)
    if None in weights:
        return None
    weight = weights[0].detach().requires_grad_()  # the same storage, trained as in distillation
    shape = (1, tokens + 1, weight.shape[1])
    hidden = torch.randn(shape, device=device, dtype=weight.dtype, requires_grad=True)
    t_hidden = torch.randn(shape[:2] + weights[1].shape[1:], device=device, dtype=weights[1].dtype)
    labels = torch.randint(0, weight.shape[0], shape[:2], device=device)
    with torch.enable_grad(), PeakMemory(device) as peak:
        fused_output_kd(hidden, weight, t_hidden, weights[1], labels, temperature=2.0)[0].backward()
    return None if peak.bytes is None else peak.bytes / (tokens * weight.shape[0])


def saved_activation_bytes(step: Callable[[], torch.Tensor], *models: torch.nn.Module) -> int:
    """Bytes autograd keeps for backward during `step` (which returns the loss), each storage counted once and the
    models' weights left out: the training memory that depends on the model, independent of device and allocator."""
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        # Detached: a saved *output* (softmax's, SDPA's) packed as itself would hold its own grad_fn, a reference
        # cycle through C++ that gc cannot free, and every graph measured would stay allocated.
        return t.detach()

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
        work, skipped = fitting(work, device)
        timings = measure(work, device, config.repeats, config.warmup)
        memory = {}
        for n, fn in work.items():  # peak above the weights, one candidate at a time, from a clean allocator
            with PeakMemory(device) as peak:
                fn()
            memory[n] = {"saved_activation_bytes": saved_activation_bytes(lambda m=models[n], n=n: loss(m, _impl(n)),
                                                                          teacher, student),
                         "peak_bytes": peak.bytes}
            free_memory(device)
        kd_entry = kd_output_bytes_per_entry(student, teacher, config.train_batch * config.train_len, device) \
            if distill else None
    finally:
        for model in (teacher, student):
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False).eval()
    tokens = config.train_batch * config.train_len
    figure = _figure("distill_step" if distill else "train_step",
                     {"batch": config.train_batch, "tokens": config.train_len}, timings, tokens,
                     _bounds(teacher, student, dtype_bytes, B=config.train_batch, T=config.train_len, P=0, train=True,
                             with_teacher=distill), skipped)
    figure["memory"] = memory
    if distill:
        figure["kd_output_bytes_per_token_vocab_entry"] = kd_entry
    return figure


def run_bench(teacher, student, config: BenchConfig, device: torch.device) -> dict:
    """All figures for one teacher/student pair; returns the JSON-able result. A figure that does not fit in memory
    is listed under `not_run` with its setting, and the others are still measured."""
    dtype = next(teacher.parameters()).dtype
    dtype_bytes = torch.finfo(dtype).bits // 8
    bandwidth = memory_bandwidth(device) if config.decode_settings() else None
    jobs = [("prefill", {"batch": 1, "tokens": n}, lambda n=n: prefill_figure(teacher, student, n, config, device,
                                                                              dtype_bytes))
            for n in config.prefill_lengths()]
    jobs += [("decode", {"batch": b, "context": c}, lambda b=b, c=c: decode_figure(
        teacher, student, b, c, config, device, dtype_bytes, bandwidth)) for b, c in config.decode_settings()]
    if config.train_len:
        setting = {"batch": config.train_batch, "tokens": config.train_len}
        jobs += [(name, setting, lambda d=distill: train_figure(teacher, student, config, device, dtype_bytes, d))
                 for name, distill in (("train_step", False), ("distill_step", True))]
    figures, not_run = [], []
    for name, setting, job in jobs:
        try:
            figures.append(job())
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            not_run.append({"figure": name, "setting": setting, "reason": "out of memory"})
            print(f"{name} {setting}: out of memory, not run")
        free_memory(device)
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
        "memory_bandwidth_bytes_per_s": bandwidth,
        "figures": figures,
        "not_run": not_run,
    }


def _ratio_cells(ratio: dict | None) -> str:
    if ratio is None:
        return "— | — | —"
    return f"{ratio['ratio']:.3f}× | {ratio['bound']:.3f}× | {ratio['achieved_over_bound']:.2f}"


def _mib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def markdown(result: dict) -> str:
    """The speed table: medians, both ratios and their bounds, achieved/bound; decode's ms per step beside the
    bandwidth limit; memory of the training steps; what did not fit."""
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
        t = [f"{f['timings_s'][c]['median'] * 1000:.1f} ms" if c in f["timings_s"]
             else f"({f.get('skipped', {}).get(c, 'not run')})" for c in CANDIDATES]
        lines.append(f"| {f['figure']} | {setting} | " + " | ".join(t) + f" | {_ratio_cells(f['ratios']['headline'])} "
                     f"| {_ratio_cells(f['ratios'].get('eager_vs_eager'))} |")
    for f in result.get("not_run", []):
        setting = ", ".join(f"{k} {v}" for k, v in f["setting"].items())
        lines.append(f"| {f['figure']} | {setting} | not run: {f['reason']} |" + " |" * 9)
    if result.get("memory_bandwidth_bytes_per_s"):
        gbps = result["memory_bandwidth_bytes_per_s"] / 1e9
        lines += ["", (f"Decode, ms per step (SDPA) beside the bandwidth limit (bytes one step reads — weights and KV "
                       f"cache — at the measured copy bandwidth, {gbps:.0f} GB/s):")]
        for f in result["figures"]:
            if "bandwidth_limit_ms" in f:
                ms, limit = f["ms_per_step"], f["bandwidth_limit_ms"]
                lines.append(f"- {f['setting']['batch']} × {f['setting']['context']}: teacher "
                             f"{ms['teacher_sdpa']:.2f} ms (limit {limit['teacher']:.2f} ms, "
                             f"{f['over_bandwidth_limit']['teacher_sdpa']:.1f}× it), student {ms['student_sdpa']:.2f} ms "
                             f"(limit {limit['student']:.2f} ms, {f['over_bandwidth_limit']['student_sdpa']:.1f}× it)")
    for f in result["figures"]:
        if "memory" in f:
            mem = f["memory"]
            cells = ", ".join(f"{c.replace('_', ' ')} {_mib(mem[c]['saved_activation_bytes'])} kept for backward, "
                              f"peak {_mib(mem[c].get('peak_bytes'))}" for c in CANDIDATES if c in mem)
            lines += ["", f"{f['figure']} memory above the weights: {cells}."]
            if f.get("kd_output_bytes_per_token_vocab_entry") is not None:
                lines[-1] += (f" The distillation losses' own peak: {f['kd_output_bytes_per_token_vocab_entry']:.2f} "
                              "bytes per (token × vocabulary) entry.")
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
