"""The stack echoatt is tested on: the ranges in its own package metadata (pyproject.toml), checked at import."""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

VERSION = "0.1.0"  # echoatt's own (pyproject.toml reads it from here)


def declared_range(package: str) -> str | None:
    """The version range echoatt's metadata declares for `package` (e.g. '<5.25,>=5.10.4'), None if not declared or
    echoatt is not installed (a source checkout on PYTHONPATH)."""
    try:
        requires = metadata.requires("echoatt") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        req = Requirement(line)
        if req.name == package and req.marker is None:
            return str(req.specifier)
    return None


def check_transformers(installed: str | None = None) -> str | None:
    """Warn (once per process, through `warnings`) when transformers is outside the tested range; return the message."""
    import transformers

    installed = installed or transformers.__version__
    spec = declared_range("transformers")
    if spec is None or Requirement(f"transformers{spec}").specifier.contains(Version(installed), prereleases=True):
        return None
    message = (f"echoatt is tested with transformers {spec} but {installed} is installed: the KV cache and model "
               "outputs may differ silently; `bash scripts/setup.sh` installs the tested set (requirements.lock)")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message
