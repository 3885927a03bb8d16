"""llama.cpp's OpenAI-compatible server (llama-cpp-python's `llama_cpp.server`) for the load benchmark; runs inside
benchmarks/.venvs/llamacpp (installed with its `[server]` extra by benchmarks/peers/setup.sh). Started by
benchmarks/load.py, which drives it with the same clients as `kvbound serve`.

Its command line is `python -m llama_cpp.server`'s, unchanged, plus `--no-extra-bufts`, which turns llama.cpp's
extra CPU weight buffers (weight repacking) off first, as benchmarks/peers/llamacpp_decode.py can: they are on by
default, as llama.cpp's users get them, and crash with quantized weights on some CPUs (not on this project's).

    benchmarks/.venvs/llamacpp/bin/python benchmarks/peers/llamacpp_server.py --model M.gguf --n_ctx 2048 \
        --n_threads 1 --n_threads_batch 1 --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_decode import no_extra_buffers  # noqa: E402


def main() -> int:
    if "--no-extra-bufts" in sys.argv:
        sys.argv.remove("--no-extra-bufts")
        no_extra_buffers()
    from llama_cpp.server.__main__ import main as serve

    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
