"""How good and how fast: perplexity and key tokens, zero-shot tasks through lm-evaluation-harness (offline task
files in `lm_eval_tasks/`), timings, and the report (which needs no torch)."""
