#!/usr/bin/env bash
# Create the peers' venvs under benchmarks/.venvs/ (git-ignored). torch is installed first, from the CPU wheel,
# because pip would otherwise pull a multi-GB CUDA build as a dependency. llama-cpp-python builds from its
# sdist (cmake + a C/C++ compiler; several minutes) for this CPU, as its users build it for speed
# (CMAKE_ARGS=-DGGML_NATIVE=ON unless CMAKE_ARGS is set); an installed build that lacks a SIMD level of this CPU
# (a generic wheel, a build from another machine) is rebuilt. Its [server] extra (fastapi, uvicorn,
# sse-starlette, pydantic-settings, starlette-context) is for benchmarks/load.py.
#   bash benchmarks/peers/setup.sh [kvpress] [llamacpp]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(kvpress llamacpp)
for name in "${targets[@]}"; do
  venv=benchmarks/.venvs/$name
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  case $name in
    kvpress)
      "$venv/bin/pip" install "$TORCH" --index-url https://download.pytorch.org/whl/cpu \
        || "$venv/bin/pip" install "$TORCH"
      "$venv/bin/pip" install kvpress "transformers<5.3" gguf accelerate rich psutil ;;
    llamacpp)
      "$venv/bin/pip" install numpy rich psutil
      check() { PYTHONPATH=. "$venv/bin/python" -c "
import sys; from benchmarks import common
info, why = common.llamacpp_build(sys.executable)
print(info or why); sys.exit(0 if info else 1)"; }
      if ! check >/dev/null 2>&1; then
        CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=ON} CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
          "$venv/bin/pip" install --no-cache-dir --force-reinstall 'llama-cpp-python[server]'
      fi
      check ;;
    *) echo "unknown peer '$name' (kvpress, llamacpp)" >&2; exit 2 ;;
  esac
done
