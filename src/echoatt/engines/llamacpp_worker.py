"""Teacher and student GGUF files timed in llama.cpp, interleaved: the worker `echoatt bench --engine llama.cpp` runs in
the llama.cpp environment (`python .../echoatt/engines/llamacpp_worker.py REQUEST.json`; it prints one `RESULT {json}` line). It
imports only llama-cpp-python and the standard library, so that environment needs no echoatt.

The two figures of llama.cpp's own `llama-bench`: prompt processing (`pp`: one batch of N prompt tokens from an empty
cache) and text generation (`tg`: G tokens one at a time after that prompt). Random token ids, the same for both
models; the order alternates every repeat, after one untimed warm-up of each.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path


def timings(llm, prompt: list[int], generate: int) -> tuple[float, float]:
    """Seconds for the prompt in one batch, then for `generate` single-token steps."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    token = prompt[-1]
    start = time.perf_counter()
    for _ in range(generate):
        llm.eval([token])
    return prompt_s, time.perf_counter() - start


def timed(request: dict) -> dict:
    from llama_cpp import Llama

    threads = request["threads"] or os.cpu_count()
    models = {name: Llama(model_path=path, n_ctx=request["prompt"] + request["generate"] + 8,
                          n_batch=request["prompt"], n_threads=threads, verbose=False)
              for name, path in request["models"].items()}
    rng = random.Random(0)
    prompt = [rng.randrange(3, min(m.n_vocab() for m in models.values())) for _ in range(request["prompt"])]
    got: dict[str, dict[str, list[float]]] = {name: {"pp": [], "tg": []} for name in models}
    for repeat in range(-1, request["repeats"]):  # -1: the warm-up
        for name in list(models) if repeat % 2 == 0 else list(reversed(models)):
            pp, tg = timings(models[name], prompt, request["generate"])
            if repeat >= 0:
                got[name]["pp"].append(pp)
                got[name]["tg"].append(tg)
    return {"threads": threads, "timings_s": {
        name: {fig: {"median": statistics.median(t), "min": min(t), "max": max(t)} for fig, t in figs.items()}
        for name, figs in got.items()}}


if __name__ == "__main__":
    import llama_cpp

    request = json.loads(Path(sys.argv[1]).read_text())
    print("RESULT " + json.dumps({"llama_cpp_python": llama_cpp.__version__, **timed(request)}), flush=True)
