"""llama.cpp: `echoatt bench --engine llama.cpp` — teacher and student exported to GGUF and timed in llama.cpp (the
worker `llamacpp_worker.py`, in llama.cpp's environment), each figure beside its bound."""

from __future__ import annotations

from pathlib import Path

from echoatt.engines.environments import run_worker

GGUF_BYTES = {"f32": 4, "f16": 2, "q8_0": 1}  # bytes per weight the decode bound counts (q8_0: 34 bytes per 32)


def bench_llamacpp(config, teacher: Path, student: Path, folder: Path) -> dict:
    """Teacher and student exported to GGUF at each of `config.gguf_types`, timed in llama.cpp (pp and tg), with the
    bounds beside: prompt processing by FLOPs, generation by bytes at the mean context."""
    from transformers import AutoConfig

    from echoatt.engines.gguf_export import export_gguf
    from echoatt.inputs.teacher import gguf_of
    from echoatt.planning.cost_model import bound

    tokenizer = gguf_of(teacher)
    teacher_config, student_config = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
    p, g = config.gguf_prompt, config.gguf_generate
    figures = []
    for kind in filter(None, config.gguf_types.split(",")):
        files = {name: folder / f"{name}-{kind}.gguf" for name in ("teacher", "student")}
        for name, source in (("teacher", teacher), ("student", student)):
            print(f"exporting the {name} to {files[name]}")
            export_gguf(source, files[name], kind, tokenizer)
        measured = run_worker("llama.cpp", "llamacpp_worker.py",
                              {"models": {k: str(v) for k, v in files.items()}, "prompt": p, "generate": g,
                               "repeats": config.repeats, "threads": config.threads})
        flags = {"teacher_eager": False, "student_eager": False, "dtype_bytes": GGUF_BYTES[kind]}
        bounds = {"pp": bound(teacher_config, student_config, B=1, T=p, P=0, logits=1, **flags).value,
                  "tg": bound(teacher_config, student_config, B=1, T=1, P=p + g // 2, **flags).value}
        for fig, tokens in (("pp", p), ("tg", g)):
            t, s = (measured["timings_s"][name][fig] for name in ("teacher", "student"))
            figures.append({"type": kind, "figure": f"{fig}{tokens}", "timings_s": {"teacher": t, "student": s},
                            "tokens_per_s": {"teacher": tokens / t["median"], "student": tokens / s["median"]},
                            "ratio": t["median"] / s["median"], "bound": bounds[fig]})
    return {"engine": "llama.cpp", "llama_cpp_python": measured["llama_cpp_python"], "threads": measured["threads"],
            "repeats": config.repeats, "figures": figures}


def llamacpp_markdown(result: dict) -> str:
    """The llama.cpp speed table: tokens/s of teacher and student per type and figure, ratio beside its bound."""
    lines = [(f"llama.cpp (llama-cpp-python {result['llama_cpp_python']}), {result['threads']} threads; medians of "
              f"{result['repeats']} interleaved repeats after a warm-up. pp: prompt processing in one batch (bound by "
              "FLOPs); tg: generation one token at a time after it (bound by bytes)."), "",
             "| type | figure | teacher tokens/s | student tokens/s | ratio | bound |", "|---|---|---|---|---|---|"]
    for f in result["figures"]:
        lines.append(f"| {f['type']} | {f['figure']} | {f['tokens_per_s']['teacher']:.1f} "
                     f"| {f['tokens_per_s']['student']:.1f} | {f['ratio']:.3f}× | {f['bound']:.3f}× |")
    return "\n".join(lines)
