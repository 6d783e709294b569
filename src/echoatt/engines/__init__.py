"""The engines a student runs in besides transformers, each in its own modules, importable without the others:

- vLLM: `vllm_serve` (the `vllm.general_plugins` entry point, what vLLM can run, how to serve, `bench --engine vllm`),
  `vllm_model` (the model class vLLM loads; imports vLLM), `vllm_worker` (the timing run inside vLLM's environment);
- llama.cpp: `gguf_export` (`export --format gguf`), `llamacpp_bench` (`bench --engine llama.cpp`),
  `llamacpp_worker` (the timing run inside llama.cpp's environment);
- DeciLM / Nemotron-NAS (vLLM, SGLang, TensorRT-LLM without a plugin): `decilm_export`, `configuration_decilm` (the
  config class written beside each exported folder);
- `environments`: where each engine's own Python is, and how a worker runs there.
"""
