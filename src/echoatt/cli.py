"""`echoatt` command line: subcommands map one-to-one onto the functions in `echoatt.pipeline`."""

from __future__ import annotations

import argparse
import os
import sys

from echoatt.config import (
    AnalyzeConfig,
    BenchConfig,
    CompareConfig,
    DistillConfig,
    EvalConfig,
    RunConfig,
    ShareConfig,
    add_arguments,
    from_args,
)

COMMANDS = {
    "run": (RunConfig, "the main job: analyze, share, distill, and compare perplexity before and after"),
    "analyze": (AnalyzeConfig, "measure layer x layer attention similarity; write similarity.json and a heatmap"),
    "share": (ShareConfig, "build the shared-attention student checkpoint from a teacher and a plan"),
    "distill": (DistillConfig, "train the student against the frozen teacher (resumable, accelerate-ready)"),
    "eval": (EvalConfig, "held-out perplexity and zero-shot accuracy (lm-eval) of teacher and students"),
    "compare": (CompareConfig, "attention drop vs plain copy vs head-matched copy, same layers and distillation budget"),
    "bench": (BenchConfig, "speed and size, teacher vs student, side by side with the analytic bound"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="echoatt", description="Share attention across layers, then distil.")
    subs = top.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in COMMANDS.items():
        add_arguments(subs.add_parser(name, help=help_text, description=help_text), cls)
    report = "write report.md and report.html for a run folder (heatmap, plan, curves, tables)"
    subs.add_parser("report", help=report, description=report).add_argument("run", help="the run folder (OUT)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from echoatt import pipeline  # heavy imports after argument errors are out of the way
    from echoatt.corpus import CorpusError
    from echoatt.distill import TrainingError
    from echoatt.plan import PlanError
    from echoatt.rundir import RunDirError
    from echoatt.teacher import TeacherError

    try:
        if args.command == "report":
            pipeline.report(args.run)
            return 0
        config = from_args(COMMANDS[args.command][0], args)
        getattr(pipeline, "evaluate" if args.command == "eval" else args.command)(config)
    except (TeacherError, CorpusError, PlanError, RunDirError, TrainingError, FileNotFoundError, ValueError) as err:
        print(f"echoatt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"echoatt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
