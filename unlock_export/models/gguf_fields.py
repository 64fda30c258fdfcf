"""Scalar metadata of a GGUF file, read from its header alone.

gguf-py's GGUFReader maps every field and tensor of the file (seconds for a model with a large
vocabulary); this reads the key-value section only, skips arrays without decoding them, and stops
once the wanted keys are found. GGUF v2/v3 layout: magic, version, tensor and key-value counts,
then (key, type, value) records.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import UserError

# GGUF value types -> struct format of a scalar; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, fh):
        self.fh = fh

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise ValueError("truncated header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        return self.fh.read(self.take("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:
                self.fh.seek(count * struct.calcsize(_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self.value(item)
            return None  # arrays are skipped
        raise ValueError(f"unknown value type {kind}")


def read_fields(path: str | Path, keys: set[str] | None = None, complete: bool = False) -> dict:
    """{key: value} of the header's scalar and string fields (arrays are None); only `keys` when given,
    stopping as soon as all of them are read. With `complete`, every field is read and the tensor
    table too, and a file shorter than its tensors need (a truncated download) is refused."""
    fields: dict = {}
    try:
        with open(path, "rb") as fh:
            r = _Reader(fh)
            if fh.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            version = r.take("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported")
            tensors = r.take("<Q")
            for _ in range(r.take("<Q")):
                key = r.string()
                value = r.value(r.take("<I"))
                if keys is None or complete or key in keys:
                    fields[key] = value
                    if keys is not None and not complete and len(fields) == len(keys):
                        break
            if complete:
                _check_size(r, fh, tensors, int(fields.get("general.alignment") or 32), Path(path).stat().st_size)
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"'{path}' is not a readable GGUF file ({exc}); check the file or fetch it again")
    return {k: v for k, v in fields.items() if keys is None or k in keys}


def _check_size(r: _Reader, fh, tensors: int, alignment: int, size: int) -> None:
    from gguf.constants import GGML_QUANT_SIZES

    end = 0
    for _ in range(tensors):
        r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        kind, offset = r.take("<I"), r.take("<Q")
        block, block_bytes = GGML_QUANT_SIZES.get(kind, (1, 0))
        count = 1
        for d in dims:
            count *= d
        end = max(end, offset + count // block * block_bytes)
    start = -(-fh.tell() // alignment) * alignment
    if start + end > size:
        raise ValueError(f"truncated: its tensors need {start + end} bytes, the file has {size}")


def block_count(path: str | Path) -> int | None:
    """The layer count llama.cpp reads ({architecture}.block_count), or None when the header lacks it."""
    arch = read_fields(path, {"general.architecture"}).get("general.architecture")
    if not arch:
        return None
    count = read_fields(path, {f"{arch}.block_count"}).get(f"{arch}.block_count")
    return int(count) if count is not None else None
