"""The estimator on the real default model against the measured peak RSS of `kvbound generate` (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbound.memory import estimate

ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "data" / "texts" / "prideprejudice.txt"
CONTEXT = 1024
NEW_TOKENS = 8
TOLERANCE = 0.05  # the bound; benchmarks/estimate_accuracy.py measured < 1% at 512-8192 tokens


# Runs the kvbound CLI and writes the process's VmHWM to the file named by its first argument at exit. VmHWM starts
# afresh at exec; the rusage a parent reads with wait4 (ru_maxrss) does not: a child forked from a large parent (a
# pytest process after the Ray tests: 535 MiB) carries the parent's RSS as its own peak.
CLI_WITH_PEAK = ("import atexit, runpy, sys; out = sys.argv.pop(1); "
                 "atexit.register(lambda: open(out, 'w').write(next(l for l in open('/proc/self/status') "
                 "if l.startswith('VmHWM')).split()[1])); "
                 "sys.argv[0] = 'kvbound'; runpy.run_module('kvbound', run_name='__main__', alter_sys=True)")


def peak_rss_of(args: list[str], tmp_path: Path) -> tuple[int, int, str]:
    """Run `kvbound ARGS`; return (exit code, its own peak RSS in bytes, its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # RSS barely depends on threads; a shared machine's timing does
    peak = tmp_path / "vmhwm"
    done = subprocess.run([sys.executable, "-c", CLI_WITH_PEAK, str(peak), *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, text=True)
    return done.returncode, int(peak.read_text()) * 1024 if peak.is_file() else 0, done.stderr


@pytest.mark.model
@pytest.mark.parametrize("weights,dtype", [("auto", "auto"), ("fp32", "fp32")])  # int4/int8 kept, and dense fp32
def test_estimate_within_5_percent_of_generate_peak_rss(smollm2_gguf, smollm2_tokenizer, tmp_path, weights: str,
                                                        dtype: str) -> None:
    prompt = tmp_path / "prompt.txt"
    ids = smollm2_tokenizer.encode(BOOK.read_text(encoding="utf-8")[: CONTEXT * 8])[: CONTEXT - NEW_TOKENS - 40]
    prompt.write_text(smollm2_tokenizer.decode(ids), encoding="utf-8")
    command = ["generate", "--prompt-file", str(prompt), "--max-tokens", str(NEW_TOKENS), "--greedy", "--context",
               str(CONTEXT), "--device", "cpu", "--dtype", dtype, "--weights", weights]
    code, measured, stderr = peak_rss_of(command, tmp_path)
    assert code == 0, stderr
    predicted = estimate(smollm2_gguf, context=CONTEXT, dtype=dtype, device="cpu", weights=weights)
    error = (predicted.total_peak_bytes - measured) / measured
    assert abs(error) <= TOLERANCE, (f"estimate {predicted.total_peak_bytes / 2**20:.1f} MiB vs measured "
                                     f"{measured / 2**20:.1f} MiB ({error:+.1%})")


@pytest.mark.model
def test_kv_and_weights_exact_on_the_real_model(smollm2_gguf) -> None:
    import torch

    import kvbound
    from kvbound.config import CacheConfig

    torch.set_num_threads(1)
    llm = kvbound.load(smollm2_gguf, dtype="fp32", device="cpu")
    assert estimate(smollm2_gguf, context=64, dtype="fp32").weights_bytes == llm.model.weights_bytes()
    assert llm.model.weights_bytes() == sum(p.nbytes for p in llm.model.parameters())  # dense: parameters only
    for kv_dtype in ("auto", "bf16", "int8", "int4"):
        cache = llm.new_cache(CacheConfig(tokens=CONTEXT, dtype=kv_dtype))
        expected = cache.pool.nbytes + (cache.res_k.nbytes + cache.res_v.nbytes if cache.spec.quantized else 0)
        assert estimate(smollm2_gguf, context=CONTEXT, kv_dtype=kv_dtype, dtype="fp32").kv_bytes == expected
        cache.free()
