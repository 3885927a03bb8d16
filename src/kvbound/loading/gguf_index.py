"""A lean GGUF reader: metadata as plain Python values, tensors as views of one read-only memory map.

`gguf.GGUFReader` keeps several numpy arrays per metadata element; for the default model's 49k-token vocabulary and
48k merges that is ~157 MB of RSS for the life of the reader — more than the model's weights (measured; see
BENCHMARKS.md, weights). This reader walks the same format (GGUF v2/v3, little-endian) with `struct`, keeps metadata
as lists and strings (a few MB), and takes the value types, tensor types and block sizes from the `gguf` package.
`release(t)` drops a tensor's pages from the process once it has been converted, so the file never sits in RSS whole.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32,
          "I64": np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (the message says where and why)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: GGML type, logical shape (rows first, as numpy), where its bytes are, and a view of them."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    data_offset: int
    data: np.ndarray  # plain types: (rows, cols) of their dtype; block types: (rows, bytes per row) uint8


class GGUFIndex:
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._offset = 0
        if self._take(4) != MAGIC:
            raise GGUFFormatError("GGUF magic missing")
        version, = self._unpack("<I")
        if version not in VERSIONS:
            raise GGUFFormatError(f"GGUF version {version} (this reader handles {VERSIONS}; big-endian files are "
                                  "not supported)")
        tensor_count, kv_count = self._unpack("<QQ")
        self.fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0])
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            n_dims, = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, dims, kind, offset))
        alignment = int(self.fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"alignment {alignment} is not a power of two")
        start = -(-self._offset // alignment) * alignment
        self.tensors: list[TensorInfo] = []
        for name, dims, kind, offset in infos:
            try:
                ggml_type = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise GGUFFormatError(f"tensor {name} has unknown GGML type {kind}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            shape = tuple(int(d) for d in reversed(dims))
            elements = int(np.prod(shape)) if shape else 1
            if shape[-1] % block:
                raise GGUFFormatError(f"tensor {name}: row of {shape[-1]} values is not whole {ggml_type.name} blocks")
            n_bytes = elements // block * type_size
            at = start + int(offset)
            if at + n_bytes > len(self._map):
                raise GGUFFormatError(f"tensor {name} ends past the end of the file (truncated)")
            plain = _PLAIN.get(ggml_type.name)
            if plain is not None:
                data = np.frombuffer(self._map, plain, elements, at).reshape(shape)
            else:
                data = np.frombuffer(self._map, np.uint8, n_bytes, at).reshape(*shape[:-1], shape[-1] // block * type_size)
            self.tensors.append(TensorInfo(name, ggml_type, shape, n_bytes, at, data))
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise GGUFFormatError("duplicate tensor names")

    def release(self, t: TensorInfo) -> None:
        """Tell the kernel this tensor's pages may leave RSS (they are re-read from the file if touched again)."""
        page = mmap.PAGESIZE
        first = t.data_offset // page * page
        self._map.madvise(mmap.MADV_DONTNEED, first, t.data_offset + t.n_bytes - first)

    # -- parsing ----------------------------------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        end = self._offset + n
        if end > len(self._map):
            raise GGUFFormatError(f"file ends inside the metadata (at byte {self._offset}, {n} more needed)")
        out = self._map[self._offset:end]
        self._offset = end
        return out

    def _unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _string(self) -> str:
        n, = self._unpack("<Q")
        raw = self._take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"string at byte {self._offset - n} is not UTF-8") from None

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<IQ")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self._take(count * dtype.itemsize), dtype).tolist()
            return [self._value(item) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self._offset}")
