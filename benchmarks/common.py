"""Shared helpers for the benchmark suites: thread pinning, machine facts, timing, RSS, results on disk,
a small progress bar. Only the standard library at import time, so peer scripts in other venvs use it too."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent  # the repository root
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
VENVS = BENCH / ".venvs"
SHARED_DATA = Path("/work/shared/data")
THREADS = 1  # every system in every suite runs on one thread: on a shared 2-core box more threads only add noise


def pin_threads(threads: int = THREADS) -> int:
    """Pin BLAS/OpenMP to `threads` before torch is imported, and torch itself if it already is."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already set once in this process
            pass
    return threads


def data_file(relative: str) -> Path:
    """A data file from the repo's data/ (or examples/), else the shared copy."""
    for base in (ROOT / "data", ROOT / "examples", SHARED_DATA):
        for candidate in (base / relative, base / Path(relative).name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{relative} is neither under {ROOT / 'data'} nor under {SHARED_DATA}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- machine facts ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU's SIMD-related feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo."""
    wanted = {"amx_bf16", *GGML_FEATURES}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return [f for f in line.split(":", 1)[1].split() if f in wanted]
    except OSError:
        pass
    return []


def command_line() -> str:
    """The command as typed: `python -m benchmarks.decode --quick` rather than the module's file path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        head = f"-m {spec.name}"
    else:
        script = Path(sys.argv[0]).resolve()
        head = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join(["python", head, *(shlex.quote(a) for a in sys.argv[1:])])


def machine_info(threads: int = THREADS) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "executable": sys.executable,
    }
    from importlib import metadata

    for dist in ("torch", "transformers", "kvbound", "kvpress", "llama-cpp-python"):
        try:
            info[f"{dist.replace('-', '_')}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


# -- peers built for this CPU ------------------------------------------------------------------------------------
# CPU feature flags (/proc/cpuinfo) and the name ggml's llama_print_system_info() gives each when it was compiled in.
GGML_FEATURES = {"pni": "SSE3", "ssse3": "SSSE3", "avx": "AVX", "avx2": "AVX2", "f16c": "F16C", "fma": "FMA",
                 "bmi2": "BMI2", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
                 "avx512_bf16": "AVX512_BF16", "avx_vnni": "AVX_VNNI", "amx_int8": "AMX_INT8",
                 "asimd": "NEON", "asimddp": "DOTPROD", "i8mm": "MATMUL_INT8", "sve": "SVE"}


def ggml_features(system_info: str) -> set[str]:
    """The features a ggml build reports as on ("AVX2 = 1 | ...")."""
    on = set()
    for part in system_info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() not in ("", "0"):
            on.add(name)
    return on


def missing_simd(system_info: str, flags: list[str] | None = None) -> list[str]:
    """SIMD levels this CPU has and the peer's build lacks: a peer built without them (a generic wheel, no
    GGML_NATIVE) runs several times slower than its users get, and its numbers would flatter us."""
    have = set(cpu_flags() if flags is None else flags)
    built = ggml_features(system_info)
    return sorted(name for flag, name in GGML_FEATURES.items() if flag in have and name not in built)


def llamacpp_build(python: Path | None = None) -> tuple[str | None, str]:
    """(llama_print_system_info() of the llama.cpp peer venv, "") or (None, why it cannot be used). A build that
    lacks a SIMD level of this CPU is refused: rebuild it with benchmarks/peers/setup.sh llamacpp."""
    python = python or venv_python("llamacpp")
    if not Path(python).is_file():
        return None, f"unavailable: no venv at {Path(python).parent.parent} (bash benchmarks/peers/setup.sh llamacpp)"
    probe = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                           capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode != 0:
        return None, "unavailable: llama_cpp does not import in its venv"
    info = probe.stdout.strip()
    missing = missing_simd(info)
    if missing:
        return None, (f"refused: the llama.cpp build lacks {', '.join(missing)}, which this CPU has (its system info: "
                      f"{info}); rebuild it for this CPU with `bash benchmarks/peers/setup.sh llamacpp`")
    return info, ""


# -- memory ----------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: VmHWM, which starts afresh at exec. (ru_maxrss does not:
    a child started from a big parent inherits the parent's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float | int | None) -> float | None:
    return None if n is None else round(n / 2**20, 2)


# -- timing ----------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], warmup: int = 1, repeat: int = 3) -> dict[str, float]:
    """Run `fn` warmup+repeat times; seconds of the repeats (min is the figure least hurt by other processes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"min_s": min(times), "median_s": statistics.median(times), "repeat": repeat}


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """A one-line progress bar on stderr; yields `advance(n=1, note='')`. Falls back to plain lines."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        done = [0]

        def advance(n: int = 1, note: str = "") -> None:
            done[0] += n
            print(f"[{description}] {done[0]}/{total} {note}", file=sys.stderr, flush=True)

        yield advance
        return
    from rich.console import Console

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str = "") -> None:
            bar.update(task, advance=n, note=note)

        yield advance


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- results ---------------------------------------------------------------------------------------------------
def write_result(name: str, payload: dict[str, Any], threads: int = THREADS) -> Path:
    """benchmarks/results/NAME.json with the machine facts and the exact command next to the numbers."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"suite": name, "machine": machine_info(threads), **payload}
    body["machine"]["peak_rss_mib"] = mib(peak_rss_bytes())
    path.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


def finish(name: str, result: dict[str, Any], quick: bool, markdown: Callable[[dict[str, Any]], str]) -> int:
    """A suite's last step: its JSON on disk, its tables on stdout."""
    result["quick"] = quick
    write_result(name, result)
    print(markdown(result))
    return 0


def rewrite_result(name: str, body: dict[str, Any]) -> Path:
    """Write a result read with `read_result` back, its machine facts as they were (a run added beside it)."""
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def merge_policies(saved: dict[str, Any], new: dict[str, Any], baseline: str) -> dict[str, Any]:
    """`new` (some policies run again, and the `baseline` policy's rows, e.g. the full cache, they are measured
    against) over `saved`: the saved rows of the other policies stay, the saved baseline rows go."""
    kept = [r for r in saved["rows"] if r["policy"] != baseline and r["policy"] not in new["policies"]]
    policies = list(dict.fromkeys(saved["policies"] + new["policies"]))
    return {**new, "rows": new["rows"] + kept, "policies": policies}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set):
        return sorted(value)
    return str(value)


# -- subprocesses ----------------------------------------------------------------------------------------------
def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def script_env(threads: int = THREADS) -> dict[str, str]:
    """This process's environment for a child script: BLAS/OpenMP pinned to `threads`, the repo on the path, and no
    VIRTUAL_ENV (a peer's venv python must not think it runs in ours)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.pop("VIRTUAL_ENV", None)
    return env


def run_python(python: Path | str, args: list[str], threads: int = THREADS, timeout: float | None = None,
               capture: bool = False) -> subprocess.CompletedProcess:
    """Run a benchmark script in its own process (clean RSS, its own venv), threads pinned by environment."""
    return subprocess.run([str(python), *args], cwd=ROOT, env=script_env(threads), timeout=timeout, check=False,
                          stdout=subprocess.PIPE if capture else None, text=True)


def start_python(python: Path | str, args: list[str], threads: int = THREADS) -> subprocess.Popen:
    """`run_python` without waiting: for shards of an accuracy run (never a timing) side by side."""
    return subprocess.Popen([str(python), *args], cwd=ROOT, env=script_env(threads))


def hf_cache_kwarg(model) -> str:
    """transformers 5.3+ names the cache argument `cache`; older versions `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    return plt
