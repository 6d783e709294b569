"""`echoatt` command line: subcommands map one-to-one onto the functions in `echoatt.pipeline`."""

from __future__ import annotations

import argparse
import os
import sys

from echoatt.config import AnalyzeConfig, RunConfig, ShareConfig, add_arguments, from_args

COMMANDS = {
    "run": (RunConfig, "the main job: analyze the teacher, build the shared-attention student"),
    "analyze": (AnalyzeConfig, "measure layer x layer attention similarity; write similarity.json and a heatmap"),
    "share": (ShareConfig, "build the shared-attention student checkpoint from a teacher and a plan"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="echoatt", description="Share attention across layers, then distil.")
    subs = top.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in COMMANDS.items():
        add_arguments(subs.add_parser(name, help=help_text, description=help_text), cls)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from echoatt import pipeline  # heavy imports after argument errors are out of the way
    from echoatt.corpus import CorpusError
    from echoatt.plan import PlanError
    from echoatt.teacher import TeacherError

    cls, _ = COMMANDS[args.command]
    try:
        config = from_args(cls, args)
        getattr(pipeline, args.command)(config)
    except (TeacherError, CorpusError, PlanError, FileNotFoundError, ValueError) as err:
        print(f"echoatt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"echoatt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
