"""vLLM: the plugin entry point, what a student must be to run there, how to serve it, and `bench --engine vllm`.

`register` is the `vllm.general_plugins` entry point (pyproject.toml): vLLM calls it in every process it starts, and it
registers echoatt's config with transformers and `EchoAttForCausalLM` with vLLM's model registry, lazily by name, so
`vllm serve <student>` and `vllm.LLM(model=<student>)` load students with echoatt installed and nothing else to pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from echoatt.engines.environments import SERVE_ENV, run_worker
from echoatt.engines.support import decilm_refusal, gguf_refusal, vllm_refusal
from echoatt.planning.plan import SERVABLE_PLAN

ARCHITECTURE = "EchoAttForCausalLM"


def register() -> None:
    """vLLM's plugin hook: echoatt's config class for transformers, its vLLM model class by module path."""
    from vllm import ModelRegistry

    from echoatt.model.registration import register as register_student

    register_student()  # the student's config, for transformers inside vLLM

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "echoatt.engines.vllm_model:EchoAttForCausalLM")


def check_servable(config, max_model_len: int, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Refuse, by name, a student vLLM cannot run exactly (called by `vllm_model.EchoAttForCausalLM` at load; a
    family outside `FAMILIES` never gets this far: `EchoAttConfig` refuses it by name)."""
    roles = [config.role(i) for i in range(config.num_hidden_layers)]
    if "lisa" in roles:
        raise ValueError("this student has LiSA followers, which need the leader's attention logits; vLLM's attention "
                         "kernels do not expose them. Serve a copy or drop student (echoatt share --method copy|drop)")
    copies = [i for i, r in enumerate(roles) if r == "copy"]
    crossing = [i for i in copies if local_head_map(config.head_map[i], config.num_attention_heads, 1) is not None]
    if crossing and tensor_parallel > 1:
        raise ValueError(f"layers {crossing} read other leader heads (head_map); tensor parallelism would split a "
                         "head from its source: serve with --tensor-parallel-size 1")
    if copies and tensor_parallel > config.num_key_value_heads:
        raise ValueError(f"--tensor-parallel-size {tensor_parallel} is more than the {config.num_key_value_heads} KV "
                         "heads: vLLM then replicates the leaders' KV heads, which a follower's own V projection "
                         f"cannot follow; serve with --tensor-parallel-size {config.num_key_value_heads} or less")
    uneven = [i for i in range(config.num_hidden_layers) if config.ffn_width(i) % tensor_parallel]
    if uneven:
        raise ValueError(f"layers {uneven} have FFN widths {[config.ffn_width(i) for i in uneven]}, which "
                         f"--tensor-parallel-size {tensor_parallel} does not divide: serve with a size that does")
    if pipeline_parallel > 1:
        raise ValueError("echoatt's vLLM model does not implement pipeline parallelism: serve with "
                         "--pipeline-parallel-size 1 (and --tensor-parallel-size for more devices)")
    if config.context_window is not None and max_model_len > config.context_window:
        raise ValueError(f"--max-model-len {max_model_len} passes the teacher's sliding window "
                         f"({config.context_window}); echoatt students refuse contexts past it: pass "
                         f"--max-model-len {config.context_window} or less")


def local_head_map(head_map: list[int] | None, heads: int, tensor_parallel: int) -> list[int] | None:
    """The head map a follower applies on one device: None for the identity (stored as None or as the list
    0..H-1, which under tensor parallelism is the identity of each device's H / tp heads), else the map itself (one
    device: `check_servable` refuses a non-identity map across devices)."""
    if head_map is None or list(head_map) == list(range(heads)):
        return None
    if tensor_parallel > 1:
        raise ValueError("a non-identity head map cannot be split across devices (check_servable refuses it)")
    return list(head_map)


def serve_command(student: Path, config) -> str:
    """How a user serves `student` (printed by `run` and in the report). With this checkout's serve environment (vLLM
    for CPUs), the CPU form: vLLM reserves `--gpu-memory-utilization` of the host's memory there (0.92 by default,
    more than a shared machine has free)."""
    window = f" --max-model-len {config.context_window}" if config.context_window else ""
    if (Path.cwd() / SERVE_ENV).is_dir():
        return f"{SERVE_ENV}/bin/vllm serve {student}{window} --gpu-memory-utilization 0.3"
    return f"vllm serve {student}{window}"


def serving_text(student: Path, config) -> list[str]:
    """Where and how `student` (its config `config`) can be served, for the run's report and its last lines."""
    refusal = vllm_refusal(config)
    if refusal:
        return [(f"`{student}` has {refusal}: it runs in transformers (`AutoModelForCausalLM.from_pretrained`, "
                 "`generate()`); serve a copy or drop student.")]
    lines = [(f"Serve it with vLLM (echoatt's plugin loads it; on CPUs `bash scripts/setup.sh --serve` first): "
             f"`{serve_command(student, config)}`, or `vllm.LLM(model=\"{student}\")`.")]
    if config.followers():
        lines.append("Its copy followers keep the leader's keys again in vLLM's KV cache (vLLM has one K/V cache per "
                     "attention layer). Engines without plugins (llama.cpp, SGLang, TensorRT-LLM) run students whose "
                     f"attention is only kept or dropped: `--plan {SERVABLE_PLAN}` builds one, then `echoatt "
                     "export`.")
    offered = [text for check, text in (
        (gguf_refusal, (f"`echoatt export student.gguf --format gguf --student {student}` writes a GGUF file for "
                        "llama.cpp (`--type f16|q8_0`)")),
        (decilm_refusal, ("`echoatt export OUT --student ...` a DeciLM / Nemotron-NAS folder that vLLM, SGLang and "
                          "TensorRT-LLM load (`--trust-remote-code`)"))) if check(config) is None]
    if offered and not config.followers():
        lines.append(f"Without echoatt: {', '.join(offered)}.")
    return lines


def parse_cases(spec: str) -> dict[str, dict[str, int]]:
    """`name=NxP+G,...` -> {name: {"prompts": N, "prompt_len": P, "new_tokens": G}}."""
    cases = {}
    for item in filter(None, spec.split(",")):
        try:
            name, shape = item.split("=")
            batch, rest = shape.split("x")
            length, new = rest.split("+")
            cases[name] = {"prompts": int(batch), "prompt_len": int(length), "new_tokens": int(new)}
        except ValueError:
            raise ValueError(f"--serve-cases: {item!r} is not NAME=PROMPTSxLENGTH+NEW (e.g. prefill=64x512+1)") from None
        if min(cases[name].values()) < 1:
            raise ValueError(f"--serve-cases: {item!r} needs at least one prompt, prompt token and new token")
    return cases


def case_bounds(teacher_config, student_config, case: dict[str, int], dtype_bytes: int) -> dict[str, float]:
    """The analytic bounds of one case in vLLM: its prefill (FLOPs, N x P tokens) and, where it generates more than
    the first token, its decode (bytes, N sequences at the mean context). The measured ratio of a mixed case lies
    between the two. Followers as vLLM runs them (`cost_model`, engine vllm): their own kernel call on the leader's Q
    and K, with K and V cached again."""
    from echoatt.planning.cost_model import bound

    n, p, g = case["prompts"], case["prompt_len"], case["new_tokens"]
    flags = {"teacher_eager": False, "student_eager": False, "dtype_bytes": dtype_bytes, "engine": "vllm"}
    bounds = {"prefill": bound(teacher_config, student_config, B=n, T=p, P=0, logits=1, **flags).value}
    if g > 1:
        bounds["decode"] = bound(teacher_config, student_config, B=n, T=1, P=p + g // 2, **flags).value
    return bounds


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """KV-cache bytes a token costs in vLLM: K and V of every attention layer, followers included (one cache per
    layer), per query head where a follower's head map crosses KV groups; dropped layers nothing. Checked against
    what the engine allocates (`vllm_worker.allocated_kv_bytes_per_token`) in the tests and by `bench --engine vllm`."""
    from echoatt.model.configuration_echoatt import head_dim_of
    from echoatt.planning.cost_model import vllm_cached_heads

    per_head = 2 * head_dim_of(config) * dtype_bytes  # K and V
    return sum(per_head * vllm_cached_heads(config, i) for i in range(config.num_hidden_layers))


def bench_vllm(config, teacher: Path, student: Path) -> dict:
    """Time teacher and student in vLLM (`vllm_worker.py`, in the serve environment), with bounds beside."""
    from transformers import AutoConfig

    cases = parse_cases(config.serve_cases)
    request = {"models": {"teacher": str(teacher), "student": str(student)}, "cases": cases, "dtype": config.dtype,
               "eager": True, "repeats": config.repeats, "memory_fraction": 0.3}
    measured = run_worker("vllm", "vllm_worker.py", request,
                          {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")})
    teacher_config, student_config = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
    dtype = measured["dtype"]  # "auto" resolved by the worker: float32 on CPUs, bfloat16 on accelerators
    dtype_bytes = 4 if dtype == "float32" else 2
    figures = []
    for name, case in cases.items():
        t, s = measured["timings_s"][name]["teacher"], measured["timings_s"][name]["student"]
        figures.append({"figure": name, "setting": case, "timings_s": {"teacher": t, "student": s},
                        "ratio": t["median"] / s["median"],
                        "tokens_per_s": {k: case["prompts"] * (case["prompt_len"] + case["new_tokens"]) / v["median"]
                                         for k, v in (("teacher", t), ("student", s))},  # prompt + generated
                        "bounds": case_bounds(teacher_config, student_config, case, dtype_bytes)})
    kv = {"allocated": measured["kv_cache_bytes_per_token"],
          "expected": {"teacher": kv_bytes_per_token(teacher_config, dtype_bytes),
                       "student": kv_bytes_per_token(student_config, dtype_bytes)}}
    return {"engine": "vllm", "vllm": measured["vllm"], "dtype": dtype, "eager": True, "repeats": config.repeats,
            "device": measured["device"], "figures": figures, "kv_cache_bytes_per_token": kv}


def vllm_markdown(result: dict) -> str:
    """The vLLM speed table: medians, ratio, and the bounds of the case's prefill and decode parts."""
    lines = [(f"vLLM {result['vllm']}, {result['dtype']}, eager, on {result['device']}; medians of "
              f"{result['repeats']} interleaved repeats after a warm-up. Bounds: prefill by FLOPs, decode by bytes "
              "(a case that prefills and decodes lies between them)."), "",
             ("| case | prompts × length + new | teacher | student | ratio | bound prefill | bound decode "
              "| student tokens/s (prompt + new) |"), "|---|---|---|---|---|---|---|---|"]
    for f in result["figures"]:
        c, b = f["setting"], f["bounds"]
        decode = f"{b['decode']:.3f}×" if "decode" in b else "—"
        lines.append(f"| {f['figure']} | {c['prompts']} × {c['prompt_len']} + {c['new_tokens']} "
                     f"| {f['timings_s']['teacher']['median']:.2f} s | {f['timings_s']['student']['median']:.2f} s "
                     f"| {f['ratio']:.3f}× | {b['prefill']:.3f}× | {decode} "
                     f"| {f['tokens_per_s']['student']:.0f} |")
    kv, expected = result["kv_cache_bytes_per_token"]["allocated"], result["kv_cache_bytes_per_token"]["expected"]
    lines += ["", (f"KV cache vLLM allocates per token: teacher {kv['teacher']:,} bytes, student {kv['student']:,} "
                   f"({kv['student'] / kv['teacher']:.3f}×); " + ("the bounds count these bytes." if kv == expected
                   else f"the bounds count {expected['teacher']:,} and {expected['student']:,}: they are off."))]
    return "\n".join(lines)
