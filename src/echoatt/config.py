"""Typed configs for each command: dataclasses whose fields are the CLI flags; YAML in, resolved YAML out."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def opt(default: Any, help: str) -> Any:  # noqa: A002
    return field(default=default, metadata={"help": help})


@dataclass
class CommonConfig:
    teacher: str = opt("default", "teacher: HF model directory or hub id, a .gguf file, or 'default' (SmolLM2-135M)")
    corpus: str = opt("default", "text: a .txt/.jsonl file, a folder of them, a saved datasets folder, or 'default'")
    seq_len: int = opt(512, "tokens per training/analysis window")
    out: str = opt("runs/echoatt", "output folder")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    seed: int = opt(0, "random seed")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")


@dataclass
class AnalyzeConfig(CommonConfig):
    num_sequences: int = opt(16, "training windows the attention similarity is measured on")
    threshold: float = opt(0.8, "head-matched similarity a layer needs to its leader for the suggested plan")


@dataclass
class ShareConfig(CommonConfig):
    plan: str = opt("k=2", "sharing plan: k=N[,first][,last], threshold=X[,max=N], blocks like 1-2,4-6, or none")
    head_map: str = opt("matched", "follower head -> leader head: matched (most similar head) or identity (plain copy)")
    similarity: str = opt("", "similarity.json from `echoatt analyze` (default: OUT/similarity.json, else analyse)")


@dataclass
class RunConfig(AnalyzeConfig, ShareConfig):
    """The main job: analyze -> share (and, as they land, distill -> evaluate -> report)."""


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--flag` per dataclass field (defaults left unset so a YAML --config can fill them)."""
    parser.add_argument("--config", help="YAML file with any of these options (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = bool if isinstance(f.default, bool) else type(f.default)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default: {f.default})")


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults, then the YAML file, then the flags given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"{args.config}: unknown options {sorted(unknown)}")
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if v is not None and k in {f.name for f in dataclasses.fields(cls)}})
    return cls(**values)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
