"""Write a student for engines without echoatt (`echoatt export`): a DeciLM / Nemotron-NAS folder or one GGUF file."""

from __future__ import annotations

from pathlib import Path

from echoatt.engines.decilm_export import export_decilm
from echoatt.run.config import ExportConfig

FORMATS = ("decilm", "gguf")


def export(config: ExportConfig) -> Path:
    """Write the student `config.student` in `config.format` to `config.out`."""
    if config.format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {config.format!r})")
    if not config.out:
        raise ValueError("name the output: echoatt export OUT (a folder for decilm, a .gguf file for gguf)")
    student = Path(config.student)
    if not (student / "config.json").is_file():
        raise FileNotFoundError(f"{student} is not a student checkpoint (no config.json): run `echoatt run` or "
                                "`echoatt share` first, or pass --student")
    if config.format == "gguf":
        return export_to_gguf(config, student)
    out = export_decilm(student, Path(config.out))
    print(f"wrote {out} (DeciLM / Nemotron-NAS); serve it without echoatt: vllm serve {out} --trust-remote-code")
    return out


def export_to_gguf(config: ExportConfig, student: Path) -> Path:
    from echoatt.engines.gguf_export import export_gguf
    from echoatt.inputs.teacher import gguf_of
    from echoatt.run.rundir import saved_identity

    out = Path(config.out)
    out = out if out.suffix == ".gguf" else out / f"{student.name}-{config.type}.gguf"
    if config.tokenizer == "auto":
        teacher = (saved_identity(student) or {}).get("teacher")
        source = gguf_of(teacher) if teacher else None
    else:
        source = None if config.tokenizer == "hf" else Path(config.tokenizer)
    export_gguf(student, out, config.type, source)
    print(f"wrote {out} ({config.type}; tokenizer from {source or 'the student'}); run it in llama.cpp, e.g. "
          f"llama-cli -m {out}")
    return out
