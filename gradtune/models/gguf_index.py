"""The metadata and tensor table of a .gguf file in one pass, its tensors as views of a memory map.

    index = read_index("SmolLM2-135M-Instruct.Q4_1.gguf")
    index.fields["llama.block_count"]            # 30
    t = index.tensors[0]; t.name, t.type_name     # "token_embd.weight", "Q8_0"
    raw = index.data(t)                           # numpy view: (rows, bytes per row) for block types

Why not ``gguf.GGUFReader``: it decodes every metadata value into numpy views, one per string, so a
vocabulary of 49,152 tokens and ~49,000 merges costs seconds of Python per open; callers that need
the tensor table (quantised bases, the memory check, our GPT's GGUF loader) open a file more than
once per run. Here string arrays are skipped by their lengths and kept only when short
(``MAX_STRINGS``), unless ``strings=True`` (the export copies a whole vocabulary).

Layout (little-endian, GGUF v2/v3): magic ``GGUF``, u32 version, u64 tensor count, u64 key count;
each key: string name, u32 value type, value; each tensor: string name, u32 n_dims, n_dims x u64
dims (innermost first), u32 ggml type, u64 offset into the data section, which starts at the next
multiple of ``general.alignment`` (32) after the table. A string is a u64 length and its bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value type -> struct format of a scalar (8: string, 9: array are read apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MAX_STRINGS = 1024  # longer string arrays (vocabularies, merges) are skipped, not decoded
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
# ggml types a numpy dtype holds as they are (the rest come as raw bytes, as GGUFReader gives them)
PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16}
PLAIN |= {"I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order, outermost first: (rows, cols) for a matrix
    type_id: int  # ggml type (gguf.GGMLQuantizationType)
    type_name: str  # "F32", "Q4_1", ...
    n_elements: int
    n_bytes: int
    offset: int  # absolute, in the file


class GGUFIndex:
    """``fields``: key -> a scalar, a string, a list of strings or a numpy array; ``types``: key ->
    (GGUF value type,) or (ARRAY, element type), as ``GGUFReader``'s ``field.types``."""

    def __init__(self, path: Path, fields: dict[str, Any], types: dict[str, tuple[int, ...]], tensors: list):
        self.path, self.fields, self.types, self.tensors = path, fields, types, tensors
        self._map: np.memmap | None = None

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as ``GGUFReader`` gives them (a read-only view of the file): plain
        types as (rows, cols) of their dtype, others (blocks, BF16) as uint8 (rows, bytes per row)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[t.offset : t.offset + t.n_bytes]
        dtype = PLAIN.get(t.type_name)
        if dtype is not None:
            return raw.view(dtype).reshape(t.shape)
        rows = t.n_elements // t.shape[-1] if t.shape else 1
        return raw.reshape(*t.shape[:-1], t.n_bytes // rows) if len(t.shape) > 1 else raw


class _Cursor:
    def __init__(self, buf: memoryview, strings: bool):
        self.buf, self.at, self.strings = buf, 0, strings

    def u32(self) -> int:
        (v,) = U32.unpack_from(self.buf, self.at)
        self.at += 4
        return v

    def u64(self) -> int:
        (v,) = U64.unpack_from(self.buf, self.at)
        self.at += 8
        return v

    def string(self) -> str:
        n = self.u64()
        if self.at + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file at byte {self.at}")
        s = bytes(self.buf[self.at : self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return s

    def skip_strings(self, count: int) -> None:
        buf, at, unpack = self.buf, self.at, U64.unpack_from
        for _ in range(count):
            at += 8 + unpack(buf, at)[0]
        if at > len(buf):
            raise ValueError("a string array runs past the end of the file")
        self.at = at

    def value(self, vtype: int) -> tuple[Any, tuple[int, ...]]:
        """(the value or None if skipped, its types)"""
        if vtype == ARRAY:
            etype = self.u32()
            return self.array(etype, self.u64()), (ARRAY, etype)
        return self.scalar(vtype), (vtype,)

    def scalar(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype not in SCALARS:
            raise ValueError(f"unsupported GGUF value type {vtype}")
        fmt = "<" + SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return v

    def array(self, etype: int, count: int) -> Any:
        if etype == STRING:
            if count > MAX_STRINGS and not self.strings:
                self.skip_strings(count)
                return None
            return [self.string() for _ in range(count)]
        if etype not in SCALARS:
            raise ValueError(f"unsupported GGUF array element type {etype}")
        size = struct.calcsize("<" + SCALARS[etype])
        if self.at + size * count > len(self.buf):
            raise ValueError(f"an array of {count} values runs past the end of the file at byte {self.at}")
        out = np.frombuffer(self.buf, dtype="<" + SCALARS[etype], count=count, offset=self.at).copy()
        self.at += size * count
        return out


def read_index(path: str | Path, strings: bool = False) -> GGUFIndex:
    """Parse ``path``'s header, metadata and tensor table (raises ``ValueError`` or
    ``struct.error`` on a truncated or corrupt file; the caller names the file). ``strings``:
    decode long string arrays too (a vocabulary) instead of skipping them."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # lazy: optional dependency

    path = Path(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            cur = _Cursor(buf, strings)
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError("not a GGUF file")
            cur.at = 4
            version = cur.u32()
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported")
            n_tensors, n_kv = cur.u64(), cur.u64()
            fields: dict[str, Any] = {}
            types: dict[str, tuple[int, ...]] = {}
            for _ in range(n_kv):
                key = cur.string()
                value, types[key] = cur.value(cur.u32())
                if value is not None:
                    fields[key] = value
            table = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.u64() for _ in range(cur.u32())]
                table.append((name, tuple(reversed(dims)), cur.u32(), cur.u64()))
            align = int(fields.get("general.alignment", 32))
            start = -(-cur.at // align) * align
            size = len(buf)
        finally:
            buf.release()
    tensors = []
    for name, shape, type_id, offset in table:
        qtype = GGMLQuantizationType(type_id)
        block, nbytes = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape)) if shape else 1
        info = TensorInfo(name, shape, type_id, qtype.name, n, n // block * nbytes, start + offset)
        if info.offset + info.n_bytes > size:
            raise ValueError(f"tensor {name} ends at byte {info.offset + info.n_bytes}, past the file's {size}")
        tensors.append(info)
    return GGUFIndex(path, fields, types, tensors)
