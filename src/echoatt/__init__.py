"""echoatt: share attention across the layers of a Llama, Mistral or Qwen model, then distil it back to quality.

`import echoatt` registers the student with transformers' Auto classes. The names below are imported when first used,
so the command line answers `--help` without loading model code (it registers when a command runs). The package is
grouped into rooms by concern (`model`, `planning`, `building`, `training`, `evaluation`, `run`, `inputs`); the
modules' older flat paths still import (`moved.py`)."""

import sys
from pathlib import Path

from echoatt import moved
from echoatt.versions import VERSION

__all__ = ["EchoAttConfig", "EchoAttForCausalLM", "compress"]
__version__ = VERSION
LAZY = {"EchoAttConfig": "echoatt.model.configuration_echoatt", "EchoAttForCausalLM": "echoatt.model.modeling_echoatt",
        "compress": "echoatt.api"}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'echoatt' has no attribute {name!r}")


moved.install()


def _command_line() -> bool:
    """Whether this process is the `echoatt` command (its script, or `python -m echoatt.cli`)."""
    return bool(sys.argv) and (Path(sys.argv[0]).name == "echoatt" or sys.argv[0] == "-m")


if not _command_line():
    from echoatt.model.registration import register

    register()
