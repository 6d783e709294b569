"""Run in the llama.cpp environment (.venv-llamacpp) by tests/test_gguf.py: load each GGUF file of a job file in
llama.cpp (llama-cpp-python, CPU), score token-id prompts and greedy-generate; print one JSON line per model.

`python tests/llamacpp_worker.py JOBS.json` with JOBS a list of {"model", "prompts", "max_tokens"}: for each prompt
the logits of every position (`all_logits`) or of the last (default), and the greedy continuation; or of
{"model", "texts"}: each text's tokens."""

import json
import sys
from pathlib import Path


def tokenized(job: dict) -> dict:
    """Each text as llama.cpp tokenizes it (special tokens parsed, BOS/EOS as the file says to add them)."""
    from llama_cpp import Llama

    llm = Llama(model_path=job["model"], vocab_only=True, verbose=False)
    return {"model": job["model"], "tokens": [llm.tokenize(t.encode(), add_bos=True, special=True) for t in job["texts"]]}


def run(job: dict) -> dict:
    from llama_cpp import Llama

    # an f32 KV cache (llama.cpp keeps f16 by default), so that an f32 file is compared at f32 throughout
    llm = Llama(model_path=job["model"], n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2, type_k=0,
                type_v=0)
    logits, tokens = [], []
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        scores = llm.scores[: len(prompt)]  # (T, V) float32
        logits.append(scores.tolist() if job.get("all_logits") else scores[-1].tolist())
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) == job["max_tokens"]:
                break
        tokens.append(out)
    return {"model": job["model"], "logits": logits, "tokens": tokens, "arch": llm.metadata.get("general.architecture")}


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        print("RESULT " + json.dumps(tokenized(job) if "texts" in job else run(job)), flush=True)
