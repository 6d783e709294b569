"""`echoatt` command line: one subcommand per command module (`echoatt.commands`), one flag per field of its config,
grouped by the stage that reads it. Building the parser imports only the configs: `--help`, `--version` and a bad
flag answer at once, and a command's own module (torch, transformers, lm-eval, accelerate) is imported when it runs.
Every option is checked (`config.validate()`) before the command's first long step; bad input is one line on stderr
and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from echoatt.common import TrainingError, disk_full, first_line
from echoatt.model.registration import register
from echoatt.run.config import (
    AnalyzeConfig,
    BenchConfig,
    CommonConfig,
    CompareConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    PrecisionConfig,
    ReportConfig,
    RunConfig,
    ShareConfig,
    load_yaml,
    options,
)

COMMANDS = {  # name -> (config class, "module:function" run with it, help)
    "run": (RunConfig, "echoatt.commands.run:run",
            ("the main job: analyze, share (plan, calibration), distill, then perplexity (validation and another kind "
            "of text), retrieval and zero-shot of teacher and student before and after, a short speed check, the "
            "report")),
    "analyze": (AnalyzeConfig, "echoatt.commands.analyze:analyze",
                "measure layer x layer attention similarity on real text; write similarity.json and a heatmap"),
    "share": (ShareConfig, "echoatt.commands.share:share",
              "build the student checkpoint from a teacher and a plan (calibrated with --calibrate)"),
    "distill": (DistillConfig, "echoatt.training.distill:distill",
                ("train the student against the frozen teacher (resumable; accelerate launch / torchrun for more "
                "processes)")),
    "eval": (EvalConfig, "echoatt.commands.evaluate:evaluate",
             ("perplexity (validation and --other-text), retrieval probe and zero-shot accuracy (lm-eval) of teacher "
             "and students")),
    "compare": (CompareConfig, "echoatt.commands.compare:compare",
                ("students of several methods (attention drop, plain copy, head-matched copy, LiSA, mixed) at the same "
                "layers, or at equal predicted speed (--equal-bound: the trade curve), each distilled and scored")),
    "bench": (BenchConfig, "echoatt.commands.bench:bench",
              ("speed, memory and size, teacher vs student, beside the analytic bounds: echoatt's PyTorch model "
              "(or --arch shapes with random weights), vLLM or llama.cpp (--engine)")),
    "export": (ExportConfig, "echoatt.commands.export:export",
               ("a student whose attention is only kept or dropped, for engines without echoatt: a DeciLM / "
               "Nemotron-NAS folder (vLLM, SGLang, TensorRT-LLM) or, with --format gguf, one GGUF file (llama.cpp)")),
    "report": (ReportConfig, "echoatt.commands.report:report",
               "write report.md and report.html for a run folder (heatmap, plan, curves, tables)"),
}
STAGES = {  # the config class that declares a field -> the heading its flags are listed under
    CommonConfig: "teacher, text and where to write",
    AnalyzeConfig: "analysis",
    PrecisionConfig: "precision",
    ShareConfig: "the student (plan, method, calibration)",
    DistillConfig: "distillation",
    EvalConfig: "evaluation",
}
# Errors that mean "this input cannot be used" (every echoatt input error is a ValueError): one line, exit code 2.
INPUT_ERRORS = (ValueError, FileNotFoundError, TrainingError)


def version() -> str:
    from echoatt.versions import VERSION

    return VERSION


def stage_of(cls: type, name: str) -> str:
    """The heading of a field's flag: the stage whose config declares it, else the command's own options."""
    for base in reversed(cls.__mro__):
        if base in STAGES and name in getattr(base, "__annotations__", {}):
            return STAGES[base]
    return "options of this command"


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per option of the config (defaults left unset, so a YAML --config can fill them), grouped by
    stage; a field marked `positional` is a positional argument."""
    parser.add_argument("--config", help="YAML file with any of these options (flags override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in options(cls):
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=f.metadata["help"])
            continue
        stage = stage_of(cls, f.name)
        group = groups.get(stage) or groups.setdefault(stage, parser.add_argument_group(stage))
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if "(default" not in text and f.default not in ("", None) and not isinstance(f.default, bool):
            text += f" (default: {f.default})"
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default: {'on' if f.default else 'off'})")
        else:
            group.add_argument(flag, type=type(f.default), default=None, help=text)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """Defaults, then the YAML file, then the flags given."""
    values = load_yaml(cls, args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if v is not None and k in names})
    return cls(**values)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="echoatt", description="Share attention across the layers of a Llama, Mistral "
                                  "or Qwen model, then distil it back to quality. `echoatt COMMAND --help` lists a "
                                  "command's options.")
    top.add_argument("--version", action="version", version=f"echoatt {version()}")
    subs = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_text) in COMMANDS.items():
        add_arguments(subs.add_parser(name, help=help_text, description=help_text), cls)
    return top


def command_function(name: str):
    module, function = COMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cls = COMMANDS[args.command][0]
    try:
        config = from_args(cls, args)
        config.validate()  # every option that needs no teacher, before anything is loaded or written
        register()  # the student's Auto classes (`import echoatt` does this outside the command line)
        command_function(args.command)(config)
    except INPUT_ERRORS as err:
        print(f"echoatt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"echoatt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk: an OSError, or safetensors' own SafetensorError saying so
        if not (isinstance(err, OSError) or type(err).__name__ == "SafetensorError") or not disk_full(err):
            raise
        print(f"echoatt {args.command}: error: the disk is full ({first_line(err)}); free space and run the same "
              "command again (the analysis, measured block effects and checkpoints already written are reused)",
              file=sys.stderr)
        return 1
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Under `torchrun` / `accelerate launch`, leave the process group before exit: a group still alive when the
    interpreter shuts down can abort the process ("terminate called without an active exception") after all the
    work is done."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
