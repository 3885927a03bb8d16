"""A peer is only reported when it is built the way its users get it at its fastest: a llama.cpp build that lacks
a SIMD level this CPU has is refused, with the reason and the fix."""

from __future__ import annotations

import subprocess
import sys

from benchmarks import common

NATIVE = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
          "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")
GENERIC = "CPU : SSE3 = 1 | SSSE3 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"  # a wheel built for any x86-64
ZEN4 = ["pni", "ssse3", "fma", "avx", "f16c", "avx2", "bmi2", "avx512f", "avx512_bf16", "avx512vbmi", "avx512_vnni"]


def test_a_native_build_has_everything_the_cpu_has():
    assert common.missing_simd(NATIVE, ZEN4) == []


def test_a_generic_build_is_missing_the_cpus_simd():
    assert common.missing_simd(GENERIC, ZEN4) == ["AVX", "AVX2", "AVX512", "AVX512_BF16", "AVX512_VBMI",
                                                  "AVX512_VNNI", "BMI2", "F16C", "FMA"]
    # what the CPU lacks is not asked of the build: an AVX2-only CPU is served by an AVX2 build
    assert common.missing_simd("CPU : AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | AVX512 = 0 |",
                               ["avx", "avx2", "f16c", "fma"]) == []


def test_a_feature_switched_off_counts_as_missing():
    assert common.missing_simd(NATIVE.replace("AVX512_VNNI = 1", "AVX512_VNNI = 0"), ZEN4) == ["AVX512_VNNI"]


def _fake_peer(tmp_path, info: str):
    """A 'python' that prints `info` for llama_print_system_info (what llamacpp_build asks the peer's venv)."""
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\necho '{info}'\n")
    exe.chmod(0o755)
    return exe


def test_llamacpp_build_refuses_a_peer_without_the_cpus_simd(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "cpu_flags", lambda: ZEN4)
    info, why = common.llamacpp_build(_fake_peer(tmp_path, GENERIC))
    assert info is None
    assert why.startswith("refused: the llama.cpp build lacks AVX, AVX2, AVX512")
    assert "bash benchmarks/peers/setup.sh llamacpp" in why
    info, why = common.llamacpp_build(_fake_peer(tmp_path, NATIVE))
    assert info == NATIVE and why == ""


def test_llamacpp_build_says_what_is_missing(tmp_path):
    info, why = common.llamacpp_build(tmp_path / "none" / "bin" / "python")
    assert info is None and "no venv" in why
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert common.llamacpp_build(broken) == (None, "unavailable: llama_cpp does not import in its venv")


def test_machine_facts_carry_torchs_cpu_capability():
    code = "import torch; from benchmarks import common; print(common.machine_info()['torch_cpu_capability'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=common.ROOT, check=True)
    assert done.stdout.strip() in ("DEFAULT", "AVX2", "AVX512", "NO AVX", "ZVECTOR", "VSX", "SVE256", "SVE")
