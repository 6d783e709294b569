"""Run in the serve environment (.venv-serve) by tests/test_serve.py: load each checkpoint of a job file in vLLM
(fp32, eager), greedy-generate from token-id prompts and score the prompts, read the KV-cache bytes a token takes;
print one JSON line per model.

`python tests/vllm_worker.py JOBS.json` with JOBS a list of {"model", "prompts", "max_tokens", "trust_remote_code",
"tensor_parallel"}."""

import json
import os
import sys
from pathlib import Path


def served_twice(job: dict) -> dict:
    """The way `vllm serve` runs by default, on CPU: prefix caching on, prompts prefilled in chunks shorter than
    them (`chunk` tokens a step), and, unless `eager`, the compiled model. Each prompt is generated twice, one request
    after another: the second finds the first's prompt in the prefix cache."""
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=job["model"], dtype="float32", max_model_len=256, enforce_eager=job.get("eager", True),
              skip_tokenizer_init=True, seed=0, max_num_seqs=4, gpu_memory_utilization=0.25,
              enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=job["chunk"])
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
    rounds = [[llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0] for p in job["prompts"]]
              for _ in range(2)]
    llm.llm_engine.engine_core.shutdown()
    return {"model": job["model"], "tokens": [[list(o.outputs[0].token_ids) for o in r] for r in rounds],
            "cached": [[o.num_cached_tokens or 0 for o in r] for r in rounds]}


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt

    tp = job.get("tensor_parallel", 1)
    if tp > 1:  # vLLM's CPU workers each bind their own cores: split this process's cores between them
        cores = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cores[i::tp])) for i in range(tp))
    llm = LLM(model=job["model"], dtype="float32", max_model_len=256, enforce_eager=True, skip_tokenizer_init=True,
              trust_remote_code=job.get("trust_remote_code", False), seed=0, max_num_seqs=len(job["prompts"]),
              gpu_memory_utilization=0.25, tensor_parallel_size=tp)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    imported = "echoatt" in sys.modules  # the plugin's doing: nothing below imported it yet
    from echoatt.engines.vllm_worker import allocated_kv_bytes_per_token

    kv = sum(llm.collective_rpc(allocated_kv_bytes_per_token))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                                                  detokenize=False))
    scored = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False))
    logprobs = [[None if d is None else d[t].logprob for t, d in zip(p, out.prompt_logprobs)]
                for p, out in zip(job["prompts"], scored)]
    llm.llm_engine.engine_core.shutdown()  # its processes end here, not at exit (see below)
    return {"model": job["model"], "echoatt_imported": imported, "kv_cache_bytes_per_token": kv,
            "tokens": [list(o.outputs[0].token_ids) for o in greedy], "prompt_logprobs": logprobs}


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        print("RESULT " + json.dumps(served_twice(job) if "chunk" in job else run(job)), flush=True)
    # vLLM's threads sometimes abort the interpreter's own shutdown ("terminate called without an active exception",
    # SIGABRT) after every result is out; the engines are shut down already, so leave without it.
    os._exit(0)
