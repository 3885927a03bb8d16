"""A chat session's state as bytes and back: the model identity a state is valid for, the cache a state is
restored into (its policy and capacity), and the serialized form (safetensors for tensors + JSON for metadata:
loading never unpickles). Field packing is the Chat's own (Chat.export_state / from_state); this module
touches no Chat internals."""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file

from kvbound.config import CacheConfig
from kvbound.errors import SnapshotError
from kvbound.kvcache.paged import PagedCache
from kvbound.kvcache.pool import BlockPool

if TYPE_CHECKING:
    from kvbound.llm import LLM

SESSION_FORMAT = 1  # layout of Chat.export_state(); bump when it changes
_FINGERPRINT_VALUES = 64  # leading values of each weight tensor that identify a model cheaply
_META_KEY = "kvbound.session"
_TENSOR = "__tensor__"

__all__ = ["SESSION_FORMAT", "SnapshotError", "model_identity", "check_model", "cache_for_state", "to_bytes",
           "from_bytes", "check_messages", "write_file", "read_file", "state_bytes"]


def model_identity(llm: "LLM") -> dict[str, Any]:
    """What a saved KV state is valid for: the model's shape, compute dtype and a digest of its weights as stored
    (the leading values of every tensor: enough to tell two checkpoints of one shape apart, milliseconds to take)."""
    digest = hashlib.sha256()
    for name, tensor in llm.model.state_dict().items():  # parameters and buffers (quantized weights, scales)
        head = tensor.flatten()[:_FINGERPRINT_VALUES].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(head.numpy().tobytes())
    c = llm.config
    return {"arch": c.arch, "layers": c.num_layers, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "vocab_size": c.vocab_size, "dtype": llm.dtype_name, "weights_sha256": digest.hexdigest()}


def check_model(llm: "LLM", state: dict[str, Any]) -> None:
    """Raise SnapshotError unless `state` is a session state of this format made with this model and dtype."""
    if not isinstance(state, dict) or state.get("format") != SESSION_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise SnapshotError(f"this session state has format {found!r}; this kvbound reads format {SESSION_FORMAT}; "
                            "rebuild the session from its messages")
    saved, ours = state.get("model", {}), model_identity(llm)
    diff = [f"{k} {saved.get(k)!r} (saved) vs {v!r} (loaded)" for k, v in ours.items() if saved.get(k) != v]
    if diff:
        raise SnapshotError(f"this session state was saved with another model or dtype: {'; '.join(diff)}; load "
                            "the model it was made with, or rebuild the session from its messages")


def cache_for_state(llm: "LLM", cache_state: dict[str, Any], pool: BlockPool | None = None) -> PagedCache:
    """An empty cache like the one `cache_state` was exported from: same KV layout and policy (with its
    settings), same capacity where `pool` allows it (a pool of its own, sized like the original, if None)."""
    policy, spec = cache_state["policy"], cache_state["spec"]
    if pool is not None and asdict(pool.spec) != spec:
        raise SnapshotError(f"the saved session stores {spec['dtype']} KV in blocks of {spec['block_size']} and the "
                            f"pool {pool.spec.dtype} in blocks of {pool.spec.block_size}; restore it into a pool of "
                            "the same KV layout")
    options = dict(tokens=int(cache_state["capacity"]), dtype=spec["dtype"], policy=policy["name"],
                   block_size=int(spec["block_size"]), evict_fraction=float(cache_state["evict_fraction"]))
    for f in fields(CacheConfig):  # the policy's settings a CacheConfig carries (sink_tokens, recent_turns)
        if f.name in policy["options"] and f.name not in options:
            options[f.name] = policy["options"][f.name]
    # Settings CacheConfig has no field for (e.g. h2o's recent_tokens) go with the policy's own options.
    options["policy_options"] = tuple(sorted(policy["options"].items()))
    return llm.new_cache(CacheConfig(**options), pool=pool)


def to_bytes(state: dict[str, Any]) -> bytes:
    """Serialize a state (nested dicts/lists of str/int/float/bool/None and CPU tensors; str keys)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = _split(state, tensors, "")
    payload = save_tensors(tensors, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})
    # safetensors has no checksum: a CRC trailer makes damaged KV data fail loudly instead of restoring garbage.
    return payload + zlib.crc32(payload).to_bytes(4, "little")


def from_bytes(blob: bytes) -> dict[str, Any]:
    """The state `to_bytes` wrote; SnapshotError if the bytes are not one (damaged, truncated, another format)."""
    blob, trailer = bytes(blob[:-4]), bytes(blob[-4:])
    if len(trailer) != 4 or zlib.crc32(blob) != int.from_bytes(trailer, "little"):
        raise SnapshotError("the saved session state is damaged (checksum mismatch); rebuild the session from its "
                            "messages")
    try:
        tensors = load_tensors(blob)
        meta = json.loads(_metadata(blob)[_META_KEY])
        return _join(meta, tensors)
    except SnapshotError:
        raise
    except Exception as e:  # safetensors/json raise assorted types for damaged bytes
        raise SnapshotError(f"the saved session state cannot be read ({type(e).__name__}: {e}); rebuild the "
                            "session from its messages") from e


def check_messages(state: dict[str, Any], messages: list[dict[str, str]], what: str) -> None:
    """SnapshotError unless `state` is of exactly these messages (roles and contents): `what` names the other side
    ("the stored ones") in the error."""
    if [(m["role"], m["content"]) for m in state["messages"]] != [(m["role"], m["content"]) for m in messages]:
        raise SnapshotError(f"the snapshot is of other messages than {what}")


def write_file(state: dict[str, Any], path: Path) -> int:
    """`to_bytes` straight to a file, without the bytes in memory: safetensors writes each tensor from where it
    lies, so the state is never copied whole. No checksum (a file only this process writes and reads back);
    returns the file's size."""
    tensors: dict[str, torch.Tensor] = {}
    meta = _split(state, tensors, "")
    save_file(tensors, path, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})
    return path.stat().st_size


def read_file(path: Path) -> dict[str, Any]:
    """The state `write_file` wrote, tensor by tensor from the file's memory map; SnapshotError if it is not one."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()[_META_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _join(meta, tensors)
    except Exception as e:  # safetensors/json raise assorted types for damaged files
        raise SnapshotError(f"the saved session state cannot be read ({type(e).__name__}: {e}); rebuild the "
                            "session from its messages") from e


def _metadata(blob: bytes) -> dict[str, str]:
    # safetensors' header: an 8-byte little-endian length, then JSON with "__metadata__" (str → str).
    size = int.from_bytes(blob[:8], "little")
    return json.loads(bytes(blob[8:8 + size]))["__metadata__"]


def _split(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"state keys must be strings (at '{path}')")
        return {k: _split(v, tensors, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot serialize {type(value).__name__} at '{path}'")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in a state (what it costs in host memory when offloaded)."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list):
        return sum(state_bytes(v) for v in state)
    return 0

