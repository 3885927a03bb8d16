"""The block pool: every KV tensor of a budget, preallocated once, plus a free list and reference counts.

Block b owns token slots [b*B, (b+1)*B) of each (layer, KV head) row, so a sequence whose blocks are
consecutive reads its keys as one view (no gather). Metadata here is plain Python; caches own block tables.
"""

from __future__ import annotations

import math
import mmap

import torch

from kvbound.errors import KVBudgetExceeded
from kvbound.kvcache.spec import FLOAT_DTYPES, KVSpec, format_bytes

STORAGE = ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")  # pool tensors, (L, n_kv, slots or blocks, ·)
PER_BLOCK = ("k_scale", "k_zero")  # indexed by block (keys are quantized per channel over a block); others by slot


LAZY_MIN_BYTES = 1 << 20


def lazy_zeros(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor whose pages cost RSS only once written. On CPU, `torch.zeros` writes every byte up front, so
    a pool sized for the model's whole context (180 MB for the default model) would be resident before the first
    token; an anonymous memory map is zero-filled by the kernel page by page, on first touch. Other devices (and
    small tensors) use `torch.zeros`: GPU memory is committed at allocation either way."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not committed_on_write(nbytes, device):
        return torch.zeros(*shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(*shape)  # the tensor keeps the map alive


def committed_on_write(nbytes: int, device: torch.device | str) -> bool:
    """Whether `lazy_zeros` gives a tensor of `nbytes` whose pages are committed when first written."""
    return torch.device(device).type == "cpu" and nbytes >= LAZY_MIN_BYTES


class BlockPool:
    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise KVBudgetExceeded(f"the KV budget holds no whole block of {spec.block_size} tokens "
                                   f"({format_bytes(spec.bytes_per_block)} per block); raise the budget",
                                   needed=spec.bytes_per_block, available=0)
        self.spec, self.num_blocks, self.device = spec, num_blocks, torch.device(device)
        L, H, D, B = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size
        slots = num_blocks * B
        if spec.quantized:
            width = D * spec.bits // 8
            self.k = lazy_zeros(L, H, slots, width, dtype=torch.uint8, device=device)  # (L, n_kv, slots, D')
            self.v = lazy_zeros(L, H, slots, width, dtype=torch.uint8, device=device)
            self.k_scale = lazy_zeros(L, H, num_blocks, D, dtype=torch.float16, device=device)  # per channel
            self.k_zero = lazy_zeros(L, H, num_blocks, D, dtype=torch.float16, device=device)
            self.v_scale = lazy_zeros(L, H, slots, D // spec.group, dtype=torch.float16, device=device)  # per token
            self.v_zero = lazy_zeros(L, H, slots, D // spec.group, dtype=torch.float16, device=device)
        else:
            dtype = FLOAT_DTYPES[spec.dtype]
            self.k = lazy_zeros(L, H, slots, D, dtype=dtype, device=device)  # (L, n_kv, slots, D)
            self.v = lazy_zeros(L, H, slots, D, dtype=dtype, device=device)
        # RSS grows with the blocks written, up to the pool, instead of the pool being resident from the start
        self.committed_on_write = committed_on_write(self.k.nbytes, self.device)
        self._free: set[int] = set(range(num_blocks))
        self.refcount = [0] * num_blocks
        # Prefix sharing (vLLM-style): the hash of a block's token chain → the block that holds it. An entry
        # lives as long as its block is referenced; blocks are shared read-only (pinned, never compacted).
        self._prefix: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- accounting ---------------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in STORAGE if hasattr(self, n)]

    @property
    def nbytes(self) -> int:
        """Bytes of the pool tensors themselves (what the budget pays for)."""
        return sum(t.nbytes for t in self.tensors())

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    # -- allocation ---------------------------------------------------------------------------------------------
    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """n free blocks; prefers the run right after block `after` so a sequence stays contiguous."""
        if n > len(self._free):
            raise KVBudgetExceeded(f"the KV pool has {len(self._free)} free blocks and {n} are needed",
                                   needed=n, available=len(self._free))
        if after is not None and all(b in self._free for b in range(after + 1, after + 1 + n)):
            ids = list(range(after + 1, after + 1 + n))
        else:
            ids = sorted(self._free)[:n]
        for b in ids:
            self._free.discard(b)
            self.refcount[b] = 1
        return ids

    def retain(self, ids: list[int]) -> None:
        for b in ids:
            if self.refcount[b] < 1:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self.refcount[b] += 1

    def release(self, ids: list[int]) -> None:
        for b in ids:
            if self.refcount[b] < 1:
                raise RuntimeError(f"block {b} released twice")
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.add(b)
                h = self._hash_of.pop(b, None)
                if h is not None and self._prefix.get(h) == b:
                    del self._prefix[h]

    def _chain(self, token_ids: list[int]) -> list[int]:
        B, h, out = self.spec.block_size, 0, []
        for i in range(len(token_ids) // B):
            h = hash((h, tuple(token_ids[i * B:(i + 1) * B])))
            out.append(h)
        return out

    def lookup_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks already holding the longest block-aligned prefix of `token_ids` (from position 0)."""
        blocks = []
        for h in self._chain(token_ids):
            b = self._prefix.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def publish_prefix(self, token_ids: list[int], blocks: list[int]) -> None:
        """Offer the full blocks holding `token_ids` (from position 0) to later sequences."""
        for h, b in zip(self._chain(token_ids), blocks):
            self.publish_block(h, b)

    def publish_block(self, chain_hash: int, block: int) -> None:
        """Offer `block` as the holder of the prefix chain `chain_hash` (unless another block already is)."""
        if chain_hash not in self._prefix:
            self._prefix[chain_hash] = block
            self._hash_of[block] = chain_hash

    def block_hash(self, block: int) -> int | None:
        """The prefix chain hash `block` is published under (None if it is not offered for sharing)."""
        return self._hash_of.get(block)

    def published_block(self, chain_hash: int) -> int | None:
        return self._prefix.get(chain_hash)

    # -- copies in storage format (sequence export/import) -------------------------------------------------------
    def read_blocks(self, ids: list[int], tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Copies of blocks `ids` exactly as stored (quantized codes stay codes): per-slot tensors cover the
        first `tokens` slots of the run (default: all), per-block ones (key scales/zeros) every block."""
        index = self._index(ids, tokens)
        return {name: tensor.index_select(2, index[name in PER_BLOCK])  # (L, n_kv, tokens or blocks, ·)
                for name, tensor in zip(STORAGE, self.tensors())}

    def write_blocks(self, ids: list[int], data: dict[str, torch.Tensor]) -> None:
        """Store `data` (from `read_blocks`, any device) into blocks `ids` (the inverse of `read_blocks`)."""
        index = self._index(ids, data["k"].shape[2])
        for name, tensor in zip(STORAGE, self.tensors()):
            tensor.index_copy_(2, index[name in PER_BLOCK], data[name].to(self.device, tensor.dtype))

    def _index(self, ids: list[int], tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first `tokens` slots of blocks `ids` in order, the block ids) as index tensors."""
        B = self.spec.block_size
        blocks = torch.tensor(ids, dtype=torch.long, device=self.device)
        return (blocks[:, None] * B + torch.arange(B, device=self.device)).flatten()[:tokens], blocks

    def block_equals(self, block: int, data: dict[str, torch.Tensor], index: int) -> bool:
        """Whether pool block `block` holds bitwise what block `index` of `data` (from `read_blocks`) holds."""
        B = self.spec.block_size
        for name, tensor in zip(STORAGE, self.tensors()):
            lo, width = (block, 1) if name in PER_BLOCK else (block * B, B)
            at = index if name in PER_BLOCK else index * B
            theirs = data[name][:, :, at:at + width]
            if theirs.shape[2] != width or not torch.equal(tensor[:, :, lo:lo + width], theirs.to(self.device)):
                return False
        return True

    # -- workspace ------------------------------------------------------------------------------------------------
    def scratch(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of K and V in the compute dtype for gathered/dequantized reads, sized once for the pool."""
        spec = self.spec
        need = self.num_blocks * spec.block_size + spec.block_size
        if self._scratch is None:
            shape = (spec.num_kv_heads, need, spec.head_dim)  # (n_kv, slots + residual, D)
            dtype = FLOAT_DTYPES[spec.compute_dtype]
            self._scratch = (torch.empty(shape, dtype=dtype, device=self.device),
                             torch.empty(shape, dtype=dtype, device=self.device))
        k, v = self._scratch
        return k[:, :tokens], v[:, :tokens]

    @property
    def workspace_bytes(self) -> int:
        return sum(t.nbytes for t in self._scratch) if self._scratch else 0
