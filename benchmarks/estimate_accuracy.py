"""How close is `kvbound estimate` to what a process really uses?

Each run is a fresh subprocess that imports what the `kvbound` CLI imports, loads the model with `kvbound.load()`,
and generates 8 tokens after a prompt (Pride and Prejudice) that fills a KV cache of `context` tokens. On CPU the
measure is the process's peak RSS (getrusage ru_maxrss: once after loading, then — the mark reset — at the end, so
the peak of the turn shows even below the load's); on CUDA torch.cuda.max_memory_allocated.
Two more subprocesses calibrate the constants of kvbound/memory/estimate.py: "runtime" (RSS after the imports and
one forward of a tiny random model); the runs' RSS right after kvbound.load() and their peak until then give the
loader's constants.

    python benchmarks/estimate_accuracy.py                      # CPU: contexts 512-8192 × weights auto/fp32 × KV auto/int8
    python benchmarks/estimate_accuracy.py --device cuda
    python benchmarks/estimate_accuracy.py --reuse              # re-estimate against the stored measurements
    python benchmarks/estimate_accuracy.py --model DIR          # another model (entry "cpu DIR-name")

Writes benchmarks/results/estimate_accuracy.json (one entry per device type) and prints a table; the headline is
the worst relative error of the total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "estimate_accuracy.json"
TEXT = ROOT / "data" / "texts" / "prideprejudice.txt"
NEW_TOKENS = 8
MiB = 1 << 20


# -- children (each in a fresh process) -----------------------------------------------------------------------------
def _child_imports(device: str):
    import psutil
    import torch

    torch.set_num_threads(1)  # RSS barely depends on threads; timing on a shared machine does
    import kvbound  # noqa: F401
    import kvbound.cli.app  # noqa: F401  (the CLI's imports: typer, rich)

    return psutil.Process(), torch


def child_runtime(device: str) -> dict:
    process, torch = _child_imports(device)
    from kvbound.config import CacheConfig, ModelConfig
    from kvbound.kvcache.factory import build_cache
    from kvbound.models.llama import LlamaModel

    imported = process.memory_info().rss
    tiny = ModelConfig("llama", 128, 64, 96, 2, 4, 2, 16, 256)
    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in LlamaModel(tiny).named_parameters()]
    model = LlamaModel.from_tensors(tiny, ((n, torch.randn(s)) for n, s in shapes), device=device)
    cache = build_cache(tiny, CacheConfig(tokens=64), "fp32", model.inv_freq, device=device)
    model(torch.tensor([[1, 2, 3]], device=device), cache)
    out = {"rss_import": imported, "rss_runtime": process.memory_info().rss}
    if device == "cuda":
        tensors = sum(p.nbytes for p in model.parameters()) + cache.pool.nbytes
        out["cuda_runtime"] = torch.cuda.max_memory_allocated() - tensors
    return out


def child_run(model: str | None, context: int, dtype: str, kv: str, device: str, weights: str) -> dict:
    process, torch = _child_imports(device)
    import resource

    import kvbound
    from kvbound.config import CacheConfig

    rss_import = process.memory_info().rss
    llm = kvbound.load(model, dtype=dtype, device=device, weights=weights, tune_allocator=True)  # as the CLI loads
    rss_loaded = process.memory_info().rss
    peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Reset the high-water mark (Linux: VmHWM and ru_maxrss) so the turn's own peak shows even below the load's.
    Path("/proc/self/clear_refs").write_text("5")
    ids = llm.tokenizer.encode(TEXT.read_text(encoding="utf-8")[: context * 8])[: context - NEW_TOKENS - 4]
    cache = CacheConfig(tokens=context, dtype=kv)
    reply = llm.generate(llm.tokenizer.decode(ids), raw=True, cache=cache, max_new_tokens=NEW_TOKENS, temperature=0.0)
    peak_turn = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"peak_rss": max(peak_loading, peak_turn), "peak_turn": peak_turn, "rss_import": rss_import,
           "rss_loaded": rss_loaded, "peak_loading": peak_loading, "prompt_tokens": reply.prompt_tokens,
           "context_tokens": reply.context_tokens, "weights_bytes": llm.model.weights_bytes()}
    if device == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    kv_cache = llm.new_cache(cache)  # after the peak was read: the allocator's real bytes, for the exact check
    out["kv_bytes"] = kv_cache.pool.nbytes + kv_cache.spec.residual_bytes
    return out


# -- parent ---------------------------------------------------------------------------------------------------------
def run_child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    model = args.model or ""
    device = args.device
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    data = {"platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
                        f"torch {torch.__version__}{gpu}",
            "model": args.model,
            "runtime": run_child("runtime", device), "runs": []}
    print(f"runtime: {data['runtime']}", flush=True)
    for weights, dtype in (config.split(":") for config in args.configs):
        for kv in args.kv:
            for context in args.contexts:
                run = {"context": context, "weights": weights, "dtype": dtype, "kv_dtype": kv,
                       **run_child("run", model, str(context), dtype, kv, device, weights)}
                print(json.dumps(run), flush=True)
                data["runs"].append(run)
    return data


def compare(data: dict, model: str | None, device: str) -> dict:
    import torch

    from kvbound.memory.estimate import estimate

    torch.set_num_threads(1)
    key = "cuda_peak" if device == "cuda" else "peak_rss"
    rows = []
    for run in data["runs"]:
        weights = run.get("weights", "fp32")  # runs before weight modes existed stored dense weights
        est = estimate(model, context=run["context"], kv_dtype=run["kv_dtype"], dtype=run["dtype"], device=device,
                       weights=weights)
        measured = run[key]
        row = {
            "context": run["context"], "weights": weights, "dtype": run["dtype"], "kv_dtype": run["kv_dtype"],
            "measured_bytes": measured, "estimated_bytes": est.total_peak_bytes,
            "error": (est.total_peak_bytes - measured) / measured,
            "kv_exact": est.kv_bytes == run["kv_bytes"], "weights_exact": est.weights_bytes == run["weights_bytes"],
            "estimate": est.to_dict()}
        if device == "cuda":  # what the activation term had to be for an exact total
            row["activation_measured_bytes"] = measured - (est.run_peak_bytes - est.activation_peak_bytes)
        elif "peak_turn" in run:  # the turn's peak over what loading left: the allocator slack's target
            row["load_error"] = (est.load_peak_bytes - run["peak_loading"]) / run["peak_loading"]
            row["activation_measured_bytes"] = run["peak_turn"] - run["rss_loaded"] - (
                est.kv_bytes + est.cache_metadata_bytes + est.workspace_bytes)
        row["activation_estimated_bytes"] = est.activation_peak_bytes
        rows.append(row)
    worst = max(rows, key=lambda r: abs(r["error"]))
    return {"rows": rows, "worst_error": worst["error"], "worst_case": {k: worst[k] for k in
                                                                        ("context", "weights", "dtype", "kv_dtype")}}


def calibration(data: dict, model: str | None, device: str) -> dict:
    """The measured values of kvbound/memory/estimate.py's constants (medians over the runs)."""
    from statistics import median

    from kvbound.loading import open_checkpoint

    if device == "cuda":
        return {"cuda_runtime_bytes": data["runtime"].get("cuda_runtime")}
    checkpoint = open_checkpoint(model)
    vocab = checkpoint.config.vocab_size
    from kvbound.models.weights import plan_weights

    def transient(run: dict) -> int:  # what a quantizing plan holds while loading, which the estimator adds itself
        plan = plan_weights(checkpoint.config, checkpoint.file_types, run.get("weights", "fp32"), run["dtype"], device)
        return plan.load_transient_bytes(checkpoint.config) if plan.quantized else 0

    runtime = data["runtime"]["rss_runtime"]
    # Runs whose weights are resident once loaded (a safetensors file already in the compute dtype stays mapped
    # and pages in on first use instead).
    runs = [r for r in data["runs"] if r["rss_loaded"] - runtime >= r["weights_bytes"]]
    return {
        "format": checkpoint.format, "runtime_rss_bytes": runtime,
        # what stays after kvbound.load() besides runtime and weights: the tokenizer
        "tokenizer_bytes_per_vocab_entry": median([(r["rss_loaded"] - runtime - r["weights_bytes"]) / vocab
                                                   for r in runs] or [0]),
        # what loading held on top, besides a quantizing plan's own transient
        "loading_bytes_per_vocab_entry": median([(r["peak_loading"] - r["rss_loaded"] - transient(r)) / vocab
                                                 for r in runs if "peak_loading" in r] or [0])}


def print_table(result: dict, label: str) -> None:
    what = "max_memory_allocated" if label.startswith("cuda") else "peak RSS"
    print(f"\n{label}: estimate vs measured {what} (MiB); act. = a turn's activations, measured vs estimated")
    print(f"{'context':>7} {'weights':>7} {'dtype':>5} {'kv':>5} {'measured':>9} {'estimate':>9} {'error':>7} {'load err':>8}  "
          f"{'act. meas':>9} {'act. est':>8}  exact KV/weights")
    for r in result["rows"]:
        load = f"{r['load_error']:>+8.2%}" if "load_error" in r else f"{'':>8}"
        act = r.get("activation_measured_bytes")
        act = f"{act / MiB:>9.1f}" if act is not None else f"{'':>9}"
        print(f"{r['context']:>7} {r.get('weights', 'fp32'):>7} {r['dtype']:>5} {r['kv_dtype']:>5} {r['measured_bytes'] / MiB:>9.1f} "
              f"{r['estimated_bytes'] / MiB:>9.1f} {r['error']:>+7.2%} {load}  {act} "
              f"{r['activation_estimated_bytes'] / MiB:>8.1f}  {r['kv_exact']}/{r['weights_exact']}")
    print(f"worst error: {result['worst_error']:+.2%} ({result['worst_case']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model path or name (default: the default model)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--configs", nargs="+", default=None, metavar="WEIGHTS:DTYPE",
                        help="weights mode and compute dtype per run (default: auto:auto fp32:fp32 on CPU, "
                             "bf16:bf16 on CUDA)")
    parser.add_argument("--kv", nargs="+", default=["auto", "int8"])
    parser.add_argument("--reuse", action="store_true", help="re-estimate against the stored measurements")
    parser.add_argument("--quick", action="store_true", help="contexts 512 and 8192, KV auto only (as a suite)")
    parser.add_argument("--label", default=None, help="entry of the results file (default: the device type, plus "
                                                     "the model folder's name when --model is given)")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "runtime":
            out = child_runtime(rest[0])
        else:
            out = child_run(rest[0] or None, int(rest[1]), rest[2], rest[3], rest[4], rest[5])
        print(json.dumps(out))
        return
    args.configs = args.configs or (["bf16:bf16"] if args.device == "cuda" else ["auto:auto", "fp32:fp32"])
    for config in args.configs:
        if config.count(":") != 1:
            raise SystemExit(f"--configs takes WEIGHTS:DTYPE pairs (e.g. auto:auto), got '{config}'")
    if args.quick:
        args.contexts, args.kv = [512, 8192], ["auto"]
    label = args.label or (f"{args.device} {Path(args.model).name}" if args.model else args.device)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.reuse:
        if label not in stored:
            raise SystemExit(f"{RESULTS} has no '{label}' measurements; run without --reuse first")
        data = stored[label]["measurements"]
    else:
        data = measure(args)
    result = compare(data, args.model, args.device)
    result["calibration"] = calibration(data, args.model, args.device)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # again: another run may have written
    stored[label] = {**result, "measurements": data}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"calibration: {json.dumps(result['calibration'])}")
    print_table(result, label)


if __name__ == "__main__":
    main()
