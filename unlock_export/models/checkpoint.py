"""Streaming access to a safetensors checkpoint directory, and its atomic, shard-wise export.

Nothing here loads a whole model: tensors are read one shard at a time, untouched shards are
copied or hard-linked byte for byte, and only shards whose tensors change are rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._io import refuse_existing
from ..choices import EXPORT_DTYPES
from ..errors import UserError
from .architectures import config_size

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
NEW_SHARD = "model-unlock-offsets.safetensors"
# a lone model.safetensors is renamed in the output: transformers would load it and ignore the index
RENAMED_SINGLE = "model-base.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SKIP_FILES = {INDEX, "config.json", "README.md", "unlock.json", ".gitattributes"}
# safetensors dtype names of the floating types a checkpoint is exported in
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
# the names a config.json gives them
DTYPE_NAMES = {name: getattr(torch, name) for name in EXPORT_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shard_header(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte it declares."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"shard '{path}' is not a valid safetensors file ({exc}); re-download it")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + length + end:
        raise UserError(f"shard '{path}' is truncated ({path.stat().st_size} bytes, header needs {8 + length + end}); re-download it")
    return header


class Checkpoint:
    """A local transformers checkpoint: config, and which shard holds each tensor."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise UserError(f"'{self.dir}' has no config.json: pass a transformers model directory or a GGUF file")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"'{config_path}' is not valid JSON ({exc.msg})")
        if (self.dir / INDEX).is_file():
            index = json.loads((self.dir / INDEX).read_text())
            self.weight_map: dict[str, str] = dict(index["weight_map"])
        elif (self.dir / SINGLE).is_file():
            self.weight_map = {}
            for name in _shard_header(self.dir / SINGLE):
                if name != "__metadata__":
                    self.weight_map[name] = SINGLE
        else:
            pickles = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = " (it holds only .bin pickles: convert them to safetensors first)" if pickles else ""
            raise UserError(f"'{self.dir}' holds no safetensors weights{hint}")
        self.headers = {}
        for shard in self.shards:
            if not (self.dir / shard).is_file():
                raise UserError(f"shard '{shard}' listed in {INDEX} is missing from '{self.dir}'")
            self.headers[shard] = _shard_header(self.dir / shard)
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise UserError(f"tensor '{name}' is listed in {INDEX} but missing from shard '{shard}'")

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> list[int]:
        return self.headers[self.weight_map[name]][name]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        return FLOAT_DTYPES.get(self.headers[self.weight_map[name]][name]["dtype"], torch.float32)

    def weights_dtype(self) -> torch.dtype:
        """The precision of the weights: the config's `dtype` (`torch_dtype` before transformers 5) when
        it names one, else the floating type most of the stored tensors have."""
        for key in ("dtype", "torch_dtype"):
            name = self.config.get(key)
            if isinstance(name, str) and name in DTYPE_NAMES:
                return DTYPE_NAMES[name]
        counts: dict[torch.dtype, int] = {}
        for name, shard in self.weight_map.items():
            found = FLOAT_DTYPES.get(self.headers[shard][name]["dtype"])
            if found is not None:
                counts[found] = counts.get(found, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def shard_dtypes(self, shard: str) -> set[torch.dtype]:
        """The floating types of the tensors in `shard`."""
        return {FLOAT_DTYPES[v["dtype"]] for k, v in self.headers[shard].items()
                if k != "__metadata__" and v["dtype"] in FLOAT_DTYPES}

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.weight_map[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    def layer_prefix(self, layers_path: str, layer: int = 0) -> str:
        """Checkpoint name prefix of decoder layers ('model.layers', or 'h' for GPT-2 files saved
        without the 'transformer.' prefix)."""
        parts = layers_path.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[i:])
            if any(n.startswith(f"{prefix}.{layer}.") for n in self.weight_map):
                return prefix
        raise UserError(f"cannot find decoder layer tensors ('{layers_path}.N.*') in '{self.dir}'")

    def _size(self, kind: str, what: str) -> int:
        value = config_size(self.config, kind)
        if value is None:
            raise UserError(f"config.json in '{self.dir}' has no {what}")
        return value

    def layer_count(self) -> int:
        return self._size("layers", "layer count")

    def hidden_size(self) -> int:
        return self._size("hidden", "hidden size")

    def side_files(self) -> list[Path]:
        """Tokenizer, generation config, chat template and the like: everything but weights,
        the index, config.json and the model card."""
        out = []
        for path in sorted(self.dir.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.name not in _SKIP_FILES \
                    and not path.name.endswith(_WEIGHT_SUFFIXES):
                out.append(path)
        return out


def check_output_path(out: Path, source: Path, overwrite: bool) -> None:
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise UserError(f"output '{out}' is inside the source model '{source}': choose a folder outside it")
    if out_r in src_r.parents:
        raise UserError(f"output '{out}' contains the source model '{source}': choose another folder")
    refuse_existing(out, overwrite)


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: fall back to a copy
    shutil.copyfile(src, dst)


def write_checkpoint(ckpt: Checkpoint, work: Path, config: dict, added: dict[str, torch.Tensor],
                     changed: dict[str, torch.Tensor], link: bool = False, progress: bool = True,
                     dtype: torch.dtype | None = None) -> dict:
    """Write the exported checkpoint into `work`: untouched shards copied (or hard-linked),
    shards holding changed tensors rewritten, added tensors in one new shard, index and config
    updated, side files copied. With `dtype`, every floating tensor is stored in that precision
    (shards in another one are rewritten) and the config says so.
    Returns {'rewritten': [...], 'copied': [...], 'added_shard': ..., 'dtype': ...}."""
    clash = [n for n in added if ckpt.has(n)]
    if clash:
        raise UserError(f"tensors {clash[:3]} already exist in the checkpoint; they cannot be added")
    rename = {SINGLE: RENAMED_SINGLE} if added else {}
    weight_map = {n: rename.get(s, s) for n, s in ckpt.weight_map.items()}
    touched = {ckpt.weight_map[n] for n in changed}
    if dtype is not None:
        touched |= {shard for shard in ckpt.shards if ckpt.shard_dtypes(shard) - {dtype}}
        added = {k: v.to(dtype) if v.is_floating_point() else v for k, v in added.items()}
        config = {**config, "dtype": dtype_name(dtype)}
        if "torch_dtype" in config:  # older transformers read this name: keep the two in step
            config["torch_dtype"] = dtype_name(dtype)
    report = {"rewritten": sorted(touched), "copied": [], "added_shard": None,
              "dtype": dtype_name(dtype) if dtype is not None else None}
    from tqdm.auto import tqdm

    for shard in tqdm(ckpt.shards, desc="write shards", unit="shard", disable=not progress or len(ckpt.shards) < 2):
        src, dst = ckpt.dir / shard, work / rename.get(shard, shard)
        if shard in touched:
            with safe_open(str(src), framework="pt") as fh:
                metadata = fh.metadata() or {"format": "pt"}
                tensors = {n: fh.get_tensor(n) for n in fh.keys()}
            for name, value in changed.items():
                if ckpt.weight_map[name] == shard:
                    tensors[name] = value.to(tensors[name].dtype)
            if dtype is not None:
                tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
            save_file(tensors, str(dst), metadata=metadata)
            del tensors
        else:
            _place(src, dst, link)
            report["copied"].append(shard)
    if added:
        save_file({k: v.contiguous() for k, v in added.items()}, str(work / NEW_SHARD), metadata={"format": "pt"})
        weight_map.update({name: NEW_SHARD for name in added})
        report["added_shard"] = NEW_SHARD
    total = 0
    for shard in set(weight_map.values()):
        header = _shard_header(work / shard)
        total += max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (work / INDEX).write_text(json.dumps(index, indent=2))
    (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for path in ckpt.side_files():
        shutil.copyfile(path, work / path.name)
    return report
