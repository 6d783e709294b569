"""Where each engine runs: its own environment (vLLM, llama.cpp), found without importing it, and echoatt's worker
scripts (files beside this one that import only the engine and the standard library) run in that environment's
Python."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SERVE_ENV = ".venv-serve"  # made by `bash scripts/setup.sh --serve`
ENGINES = {  # engine -> (its environment, the module it imports, the variable naming another Python, how to get it)
    "vllm": (SERVE_ENV, "vllm", "ECHOATT_SERVE_PYTHON",
             "`bash scripts/setup.sh --serve` (CPU: makes .venv-serve) or `pip install \"echoatt[serve]\"` (GPU)"),
    "llama.cpp": (".venv-llamacpp", "llama_cpp", "ECHOATT_LLAMACPP_PYTHON",
                  "`bash scripts/setup.sh --llamacpp` (makes .venv-llamacpp, building llama.cpp once)"),
}


def engine_python(engine: str = "vllm") -> Path:
    """The Python that has `engine`: its variable ($ECHOATT_SERVE_PYTHON, $ECHOATT_LLAMACPP_PYTHON), this one where the
    engine imports, else its environment in the working folder or in echoatt's checkout."""
    folder, module, variable, how = ENGINES[engine]
    if os.environ.get(variable):
        return Path(os.environ[variable])
    if importlib.util.find_spec(module) is not None:
        return Path(sys.executable)
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / folder / "bin" / "python"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{engine} is not installed here and there is no {folder}: run {how}, or set {variable}")


def run_worker(engine: str, script: str, request: dict, env: dict | None = None) -> dict:
    """Run echoatt's `script` (a file beside this one, which imports only the engine and the standard library: the
    engine's environment need not hold echoatt) with REQUEST.json in the engine's Python; its `RESULT {json}` line."""
    python = engine_python(engine)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "request.json"
        path.write_text(json.dumps(request))
        print(f"timing teacher and student in {engine} ({python})")
        done = subprocess.run([str(python), str(Path(__file__).with_name(script)), str(path)], env={**os.environ, **(env or {})},
                              capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{engine} bench failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
