"""Small helpers any echoatt module may import: this module imports no other echoatt module, so none of them
can import back through it (the cache folder, atomic replacement, an error in one line, what a model folder is,
the errors the command line answers in one line)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where converted teachers and tokenised data live (`ECHOATT_CACHE`, else ~/.cache/echoatt)."""
    return Path(os.environ.get("ECHOATT_CACHE", Path.home() / ".cache" / "echoatt"))


def first_line(err: BaseException) -> str:
    """An exception as one line, for error messages: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (one per process) that replaces `path` once written: a reader, or another
    process writing the same file, never sees it half-written."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    yield tmp
    tmp.replace(path)


def is_model_folder(path: Path) -> bool:
    """A folder that `from_pretrained` may load (its config.json is there)."""
    return (path / "config.json").is_file()


class TrainingError(RuntimeError):
    """Training stopped on bad input or a failure; the message says what was kept."""


def disk_full(err: BaseException) -> bool:
    """Whether a write failed for want of disk space (an OSError, or safetensors' own error saying so)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def closest(name: str, known) -> str:
    """' (did you mean X?)' naming the known names nearest a mistyped one, or '' where none is near."""
    import difflib

    near = difflib.get_close_matches(name, [str(k) for k in known], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def check_choice(flag: str, value: str, known) -> None:
    """Refuse a value that is not one of `known`, naming them and the nearest."""
    if value not in known:
        raise ValueError(f"{flag} must be one of {', '.join(map(str, known))} (got {value!r}){closest(value, known)}")
