"""`echoatt` command line: one subcommand per function in `echoatt.pipeline`, one flag per field of its config."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from safetensors import SafetensorError

from echoatt import pipeline
from echoatt.checkpoints import TrainingError, disk_full
from echoatt.config import (
    AnalyzeConfig,
    BenchConfig,
    CompareConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ReportConfig,
    RunConfig,
    ShareConfig,
    load_yaml,
)
from echoatt.corpus import CorpusError
from echoatt.export import export
from echoatt.plan import PlanError
from echoatt.rundir import RunDirError, first_line
from echoatt.teacher import TeacherError

COMMANDS = {  # name -> (config class, function, help)
    "run": (RunConfig, pipeline.run, "the main job: analyze, share, distill, and compare perplexity before and after"),
    "analyze": (AnalyzeConfig, pipeline.analyze,
                "measure layer x layer attention similarity; write similarity.json and a heatmap"),
    "share": (ShareConfig, pipeline.share, "build the shared-attention student checkpoint from a teacher and a plan"),
    "distill": (DistillConfig, pipeline.distill,
                "train the student against the frozen teacher (resumable, accelerate-ready)"),
    "eval": (EvalConfig, pipeline.evaluate,
             "held-out perplexity and zero-shot accuracy (lm-eval) of teacher and students"),
    "compare": (CompareConfig, pipeline.compare,
                "attention drop vs plain copy vs head-matched copy vs LiSA, same layers and distillation budget"),
    "bench": (BenchConfig, pipeline.bench, "speed and size, teacher vs student, side by side with the analytic bound"),
    "export": (ExportConfig, export, "write a student in a format engines without echoatt's plugin load (DeciLM)"),
    "report": (ReportConfig, pipeline.report,
               "write report.md and report.html for a run folder (heatmap, plan, curves, tables)"),
}
# Errors that mean "this input cannot be used": one line on stderr and exit code 2, never a traceback.
INPUT_ERRORS = (TeacherError, CorpusError, PlanError, RunDirError, TrainingError, FileNotFoundError, ValueError)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per dataclass field (defaults left unset so a YAML --config can fill them); a field marked
    `positional` is a positional argument."""
    parser.add_argument("--config", help="YAML file with any of these options (flags override it)")
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=f.metadata["help"])
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=None,
                                help=f"{f.metadata['help']} (default: {f.default})")


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """Defaults, then the YAML file, then the flags given."""
    values = load_yaml(cls, args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if v is not None and k in names})
    return cls(**values)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="echoatt", description="Share attention across layers, then distil.")
    subs = top.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        add_arguments(subs.add_parser(name, help=help_text, description=help_text), cls)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cls, function, _ = COMMANDS[args.command]
    try:
        function(from_args(cls, args))
    except INPUT_ERRORS as err:
        print(f"echoatt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"echoatt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, SafetensorError) as err:
        if not disk_full(err):
            raise
        print(f"echoatt {args.command}: error: the disk is full ({first_line(err)}); free space and run the same "
              "command again (the analysis, measured block effects and checkpoints already written are reused)", file=sys.stderr)
        return 1
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Under `torchrun` / `accelerate launch`, leave the process group before exit: a group still alive when the
    interpreter shuts down can abort the process ("terminate called without an active exception") after all the
    work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
