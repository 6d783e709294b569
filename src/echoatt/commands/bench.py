"""Time teacher and student (`echoatt bench`): echoatt's own PyTorch model, or each run by an engine."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from echoatt.building.student import StudentSpec
from echoatt.common import is_model_folder
from echoatt.inputs.teacher import Teacher, load_teacher, resolve_source
from echoatt.run.config import (
    BenchConfig,
    CompareConfig,
    RunConfig,
    device_of,
    record,
    setup,
)
from echoatt.run.results import quick_speed_settings
from echoatt.run.rundir import RunDir, read_student_config
from echoatt.training.precision import resolve


def bench(config: BenchConfig, loaded: Teacher | None = None) -> dict:
    """Speed and size, teacher vs student, in one process: a trained pair from OUT (`loaded`: the teacher, already
    loaded), or an architecture (--arch)."""
    from transformers import AutoModelForCausalLM

    from echoatt.evaluation.bench import benchmarked, run_bench, save
    from echoatt.model.archs import ARCHS, arch_config

    config.validate()
    if config.engine in ("vllm", "llama.cpp"):
        return bench_in_engine(config)
    if config.engine != "torch":
        raise ValueError(f"--engine must be torch, vllm or llama.cpp (got {config.engine!r})")
    setup(config)
    device = torch.device(device_of(config))
    dtypes = bench_dtypes(config.dtype, device)
    dtype = dtypes[0]
    if config.arch:
        arch = arch_config(config.arch)
        spec = StudentSpec(plan=config.plan, method=config.method, head_map="identity")
        spec.check(arch.num_hidden_layers)
        print(f"building the {config.arch} architecture with random weights")
        with torch.device(device):  # random weights made on the device, in its dtype (a 7B shape in seconds)
            teacher = AutoModelForCausalLM.from_config(arch, dtype=dtype)
        heads = list(reversed(range(arch.num_attention_heads)))  # a non-identity map, as a matched student has
        maps = [heads] * arch.num_hidden_layers if spec.mapped else None
        student, _ = spec.build(teacher, None, maps)
        name = f"bench-{config.arch if config.arch in ARCHS else Path(config.arch).stem}"
        name += "" if config.method == "copy" else f"-{config.method}"
    else:
        path = Path(config.student) if config.student else RunDir(Path(config.out)).student
        read_student_config(path)
        teacher = (loaded or load_teacher(config.teacher)).model
        student = AutoModelForCausalLM.from_pretrained(path)
        name = "bench"
    run = RunDir(record(config, "bench"))
    roles = [student.config.role(i) for i in range(student.config.num_hidden_layers)]
    narrowed = sum(student.config.ffn_width(i) != student.config.intermediate_size for i in range(len(roles)))
    print(f"plan: of {len(roles)} layers, {len(student.config.followers())} follow "
          f"({student.config.follower_type}), {roles.count('dropped')} have no attention, {roles.count('linear')} a "
          f"linear one, {narrowed} a narrowed or no FFN; "
          f"{device}, {' and '.join(map(str, dtypes))}, {torch.get_num_threads()} threads")
    results = []
    for dtype in dtypes:  # the first is the one the run trains in; fp32 beside it (results named -fp32)
        # A loaded teacher is the caller's (run, compare, echoatt.compress): timed as a converted copy, never cast
        with benchmarked(teacher, device, dtype) as timed_teacher, benchmarked(student, device, dtype) as timed:
            results.append(run_bench(timed_teacher, timed, config, device))
        print(save(results[-1], run.results(name if dtype == dtypes[0] else f"{name}-fp32")))
    return results[0]


def bench_dtypes(setting: str, device: torch.device) -> list[torch.dtype]:
    """The dtypes `--dtype` times, the first the one the run trains in: `auto` is bf16 on a GPU, bf16 beside fp32 on
    a CPU that multiplies bf16 natively (`precision.py`), fp32 elsewhere; `both` is bf16 beside fp32."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if setting == "auto":
        return [bf16] if device.type == "cuda" else [bf16, fp32] if resolve("auto", device).bf16 else [fp32]
    return {"float32": [fp32], "bfloat16": [bf16], "both": [bf16, fp32]}[setting]


def bench_in_engine(config: BenchConfig) -> dict:
    """`bench --engine vllm|llama.cpp`: this run's teacher and student, each run by the engine, timed side by side."""
    from echoatt.engines import llamacpp_bench, vllm_serve
    from echoatt.engines.environments import engine_python

    if config.arch:
        raise ValueError(f"--engine {config.engine} times a teacher and its student checkpoint; --arch is for "
                         "--engine torch")
    if config.engine == "vllm":
        vllm_serve.parse_cases(config.serve_cases)
    engine_python(config.engine)  # refuse before any work where the engine is nowhere
    run = RunDir(Path(config.out))
    student = Path(config.student) if config.student else (  # a --student given is used as it is (validated)
        run.distilled if is_model_folder(run.distilled) else run.student)
    read_student_config(student)
    teacher = Path(resolve_source(config.teacher))
    run = RunDir(record(config, "bench"))
    if config.engine == "vllm":
        result, name = vllm_serve.bench_vllm(config, teacher, student), "bench-vllm"
        table = vllm_serve.vllm_markdown(result)
    else:
        result, name = llamacpp_bench.bench_llamacpp(config, teacher, student, run.root / "gguf"), "bench-llamacpp"
        table = llamacpp_bench.llamacpp_markdown(result)
    json_path, md_path = run.results(name)
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(table + "\n")
    print(table)
    return result


def quick_speed(config: RunConfig | CompareConfig, student: Path, teacher: Teacher | None = None) -> dict[str, dict]:
    """A short measured speed of `student` against the teacher (`bench` at `quick_speed_settings`, in the precision the
    run distilled in, written beside it in config.out): {figure: {"setting", "ratio", "bound"}}, the ratio on SDPA with its analytic bound."""
    print("timing teacher vs distilled student (`echoatt bench` for the full set)")
    trains_in = "bfloat16" if resolve(config.bf16, device_of(config)).bf16 else "float32"  # as it was distilled
    result = bench(BenchConfig(**{k: getattr(config, k) for k in ("teacher", "out", "device", "seed", "threads")},
                               student=str(student), dtype=trains_in, **quick_speed_settings(device_of(config))),
                   teacher)
    return {f["figure"]: {"setting": f["setting"], "ratio": f["ratios"]["headline"]["ratio"],
                          "bound": f["ratios"]["headline"]["bound"]} for f in result["figures"]}
