"""Small helpers any echoatt module may import: this module imports no other echoatt module, so none of them
can import back through it (the cache folder, atomic replacement, an error in one line, what a model folder is,
the errors the command line answers in one line)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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


def check_disk_room(needs: list[tuple[str, Path, int]], hint: str) -> None:
    """Refuse, before long work starts, writes that would not fit: `needs` (what, folder, bytes) summed per
    filesystem, since a cache and a run folder on one disk share its free space. `hint`: what the user can change."""
    disks: dict[int, tuple[Path, list[tuple[str, int]]]] = {}
    for what, folder, size in needs:
        root = next(p for p in (folder, *folder.parents) if p.exists())
        disks.setdefault(root.stat().st_dev, (root, []))[1].append((what, size))
    for root, parts in disks.values():
        need, free = sum(size for _, size in parts), shutil.disk_usage(root).free
        if need > free:
            listed = " + ".join(f"{what} {size / 2**30:.1f} GiB" for what, size in parts)
            raise ValueError(f"not enough disk: this run writes {listed} = {need / 2**30:.1f} GiB on the disk of {root}, "
                             f"and {free / 2**30:.1f} GiB are free; {hint}")


def closest(name: str, known) -> str:
    """' (did you mean X?)' naming the known names nearest a mistyped one, or '' where none is near."""
    import difflib

    near = difflib.get_close_matches(name, [str(k) for k in known], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def check_choice(flag: str, value: str, known) -> None:
    """Refuse a value that is not one of `known`, naming them and the nearest."""
    if value not in known:
        raise ValueError(f"{flag} must be one of {', '.join(map(str, known))} (got {value!r}){closest(value, known)}")
