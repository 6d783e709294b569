"""Teacher and student timed in vLLM, interleaved: the worker `echoatt bench --engine vllm` runs in the serve
environment (`python .../echoatt/engines/vllm_worker.py REQUEST.json`; it prints one `RESULT {json}` line). It imports only vLLM
and the standard library.

Both models are loaded side by side (two engines, one busy at a time); each case is a batch of random-token prompts
of fixed length with a fixed number of generated tokens (`ignore_eos`), so teacher and student do exactly the same
work. The order alternates every repeat, after one untimed warm-up of each case on each model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time


def allocated_kv_bytes_per_token(worker) -> int:
    """Run by each vLLM worker (`LLM.collective_rpc`): the KV-cache bytes a token takes in its attention layers, as
    the engine allocates them (each layer's page bytes over its block size). The callable travels to the engine's
    process pickled, which vLLM allows only with VLLM_ALLOW_INSECURE_SERIALIZATION (set below: its own processes)."""
    return sum(spec.page_size_bytes // spec.block_size for spec in worker.get_kv_cache_spec().values())


def timed_cases(request: dict, dtype: str) -> tuple[dict, dict]:
    import random

    from vllm import LLM, SamplingParams, TokensPrompt

    cases = request["cases"]  # name -> {"prompts", "prompt_len", "new_tokens"}
    longest = max(c["prompt_len"] + c["new_tokens"] for c in cases.values())
    llms = {name: LLM(model=path, dtype=dtype, max_model_len=longest, enforce_eager=request["eager"],
                      seed=0, gpu_memory_utilization=request["memory_fraction"], skip_tokenizer_init=True,
                      max_num_seqs=max(c["prompts"] for c in cases.values()))
            for name, path in request["models"].items()}
    vocab = min(llm.llm_engine.model_config.get_vocab_size() for llm in llms.values())
    rng = random.Random(0)
    results = {}
    for case, c in cases.items():
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(c["prompt_len"])])
                   for _ in range(c["prompts"])]
        params = SamplingParams(temperature=0.0, max_tokens=c["new_tokens"], ignore_eos=True, detokenize=False)
        times: dict[str, list[float]] = {name: [] for name in llms}
        for repeat in range(-1, request["repeats"]):  # -1: the warm-up
            for name in (list(llms) if repeat % 2 == 0 else list(reversed(llms))):
                start = time.perf_counter()
                llms[name].generate(prompts, params, use_tqdm=False)
                if repeat >= 0:
                    times[name].append(time.perf_counter() - start)
        results[case] = {name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
                         for name, t in times.items()}
    kv = {name: sum(llm.collective_rpc(allocated_kv_bytes_per_token)) for name, llm in llms.items()}  # all workers
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()  # its processes end here, not at exit (see below)
    return results, kv


if __name__ == "__main__":
    from pathlib import Path

    import vllm

    request = json.loads(Path(sys.argv[1]).read_text())
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # for `allocated_kv_bytes_per_token`, before engines start

    from vllm.platforms import current_platform

    device = (f"{platform.machine()} CPU, {os.cpu_count()} cores" if current_platform.is_cpu()
              else current_platform.get_device_name())
    dtype = request["dtype"]
    if dtype == "auto":  # fp32 where the CPU kernels are exact and fast enough, bf16 on accelerators
        dtype = "float32" if current_platform.is_cpu() else "bfloat16"
    timings, kv = timed_cases(request, dtype)
    print("RESULT " + json.dumps({"vllm": vllm.__version__, "device": device, "dtype": dtype, "timings_s": timings,
                                  "kv_cache_bytes_per_token": kv}), flush=True)
    os._exit(0)  # vLLM's threads sometimes abort the interpreter's shutdown (SIGABRT); the engines are shut down
