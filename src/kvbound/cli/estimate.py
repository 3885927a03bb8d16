"""`kvbound estimate`: predicted memory of a model + KV configuration from its metadata alone (no weights load).
Terminal output only; the numbers come from kvbound.memory.estimate."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvbound.engine.runner import DEFAULT_CHUNK
from kvbound.cli.options import ModelFlag, one_model
from kvbound.kvcache.spec import KV_DTYPE_NAMES, format_bytes

KV_DTYPES = ("auto", *KV_DTYPE_NAMES)


def estimate_command(
    model: Annotated[Optional[str], typer.Argument(
        help="A .gguf file, a safetensors directory or a known name (default smollm2-135m).")] = None,
    context: Annotated[Optional[int], typer.Option(
        "--context", min=1, help="Tokens each session holds (default: the model's context).")] = None,
    kv_dtype: Annotated[str, typer.Option(
        "--kv-dtype", help=f"KV storage type: {', '.join(KV_DTYPES)} (auto: the compute dtype).")] = "auto",
    kv_budget: Annotated[Optional[str], typer.Option(
        "--kv-budget", help="Size each session's KV cache in bytes instead, e.g. 64MiB.")] = None,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Prefill chunk in tokens.")] = DEFAULT_CHUNK,
    sessions: Annotated[int, typer.Option("--sessions", min=1, help="Chat sessions held at once.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")] = False,
    memory_budget: Annotated[Optional[str], typer.Option(
        "--memory-budget", help="Memory for the whole process, e.g. 2GiB: find the longest context that fits.")] = None,
    turn_tokens: Annotated[Optional[int], typer.Option(
        "--turn-tokens", min=1, help="With --memory-budget: how many turns of this many tokens fit.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: auto, fp32, bf16, fp16.")] = "auto",
    weights: Annotated[str, typer.Option(
        "--weights", help="Weights storage: auto (a quantized GGUF stays int4/int8), fp32, bf16, fp16, int8, int4.")
    ] = "auto",
    device: Annotated[str, typer.Option(
        "--device", help="Device to predict for: auto, cpu or cuda (a GPU need not be present).")] = "auto",
    policy: Annotated[str, typer.Option(
        "--policy", help="The eviction policy the sessions run (as for chat/serve): an evicting one keeps the KV "
                         "full and, with recall, an archive of evicted text; compactor adds per-head scores.")
    ] = "none",
    recall: Annotated[str, typer.Option(
        "--recall", help="auto (an archive per session when the policy evicts), on, or off (no recall, or "
                         "archives kept in a server's --data-dir store).")] = "auto",
    model_flag: ModelFlag = None,
) -> None:
    """Predict memory before loading: weights, KV (per token, at the context), activations, baseline, total."""
    from kvbound.memory.estimate import estimate

    model = one_model(model, model_flag)
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"--kv-dtype {kv_dtype}: choose one of {', '.join(KV_DTYPES)}")
    if turn_tokens is not None and memory_budget is None:
        raise ValueError("--turn-tokens counts the turns that fit a --memory-budget; give one")
    result = estimate(model, context=context, kv_dtype=kv_dtype, kv_budget=kv_budget, chunk=chunk, sessions=sessions,
                      dtype=dtype, device=device, memory_budget=memory_budget, weights=weights, policy=policy,
                      recall=recall)
    turns = result.turns_that_fit(memory_budget, turn_tokens) if turn_tokens is not None else None
    out = Console(soft_wrap=True, highlight=False)
    if json_out:
        data = result.to_dict()
        if turns is not None:
            data["turns_that_fit"] = turns
        out.print(json.dumps(data), markup=False)
        return
    out.print(_table(result, turns))


def _table(result, turns: int | None) -> Table:
    r = result
    measure = "max_memory_allocated" if r.device == "cuda" else "peak RSS"
    each = f" × {r.sessions} sessions" if r.sessions > 1 else ""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(overflow="fold", style="dim")
    rows = [
        ("model", escape(r.model), f"{r.format} · {r.dtype} on {r.device}"),
        ("weights", format_bytes(r.weights_bytes), f"{r.weights_bytes:,} bytes · " + ", ".join(
            f"{count} {kind}" for kind, count in sorted(r.weights_storage.items()))),
        ("KV per token", format_bytes(r.kv_bytes_per_token), r.kv_dtype),
        ("KV cache", format_bytes(r.kv_bytes), f"{r.capacity_tokens:,} tokens{each}, when full"),
        ("cache metadata", format_bytes(r.cache_metadata_bytes), "positions, segments, scores (compactor: per head, and key moments)"),
        ("workspace", format_bytes(r.workspace_bytes), "dequantize scratch"),
        ("recall archive", format_bytes(r.archive_bytes), "evicted turns' text, full (recall on, evicting policy)"),
        ("activations", format_bytes(r.activation_peak_bytes), f"{r.chunk}-token prefill chunk"),
        ("baseline", format_bytes(r.baseline_bytes), "runtime + tokenizer"),
        ("loading", format_bytes(r.loader_bytes), "metadata + conversion, until loaded"),
        ("peak loading", format_bytes(r.load_peak_bytes), "baseline + loading + weights"),
        ("peak of a turn", format_bytes(r.run_peak_bytes), "baseline + weights + KV + the rest"),
        ("total peak", format_bytes(r.total_peak_bytes), f"predicted {measure}"),
        ("longest context", f"{r.max_context_tokens:,} tokens", _limit(r)),
    ]
    if turns is not None:
        rows.append(("turns that fit", f"{turns:,}", "of --turn-tokens each, without evicting"))
    for row in rows:
        table.add_row(*row)
    return table


def _limit(result) -> str:
    if result.memory_budget_bytes is not None:
        return f"within {format_bytes(result.memory_budget_bytes)} of memory"
    if result.kv_budget_bytes is not None:
        return f"within {format_bytes(result.kv_budget_bytes)} of KV"
    return "the model's trained context"
