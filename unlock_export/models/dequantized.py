"""A GGUF model dequantized once: a safetensors checkpoint cached beside the GGUF file.

transformers' GGUF loader dequantizes every tensor on every load (about 20 s for a 1.5B on two CPU
cores). The first load writes the result, in the precision the model was released in, as an ordinary
checkpoint folder `.NAME.gguf.dequantized` beside the file (or in the user cache when that folder
cannot be written); every later stage and run loads that folder, memory-mapped. The folder records
the GGUF's sha256 (a zoo model's is known; any other file's is computed once), size and mtime: a GGUF
that changed, or a folder that is incomplete or damaged, is rebuilt. The folder is written atomically.

Precision: a float32, float16 or bfloat16 GGUF keeps its own; a quantized one is written in bfloat16,
the precision the Hub releases quantized files are made from are nearly all in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from . import zoo

log = logging.getLogger("unlock_export")

RECORD = "dequantized.json"
FORMAT = 2  # 2: the generation config names every end-of-text token
# llama.cpp's general.file_type (LLAMA_FTYPE): the unquantized ones; every other value is quantized
_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
QUANTIZED_DTYPE = "bfloat16"


def release_dtype(gguf: Path) -> str:
    """The precision a GGUF's dequantized checkpoint is written in (see the module docstring)."""
    from .gguf_fields import read_fields

    file_type = read_fields(gguf, {"general.file_type"}).get("general.file_type")
    if file_type is None:
        return _dtype_of_tensors(gguf)
    return _FILE_TYPES.get(int(file_type), QUANTIZED_DTYPE)


def _dtype_of_tensors(gguf: Path) -> str:
    """A GGUF without general.file_type (written by hand): float32 unless it holds quantized tensors."""
    from gguf import GGUFReader
    from gguf.constants import GGMLQuantizationType as Q

    kinds = {t.tensor_type for t in GGUFReader(str(gguf)).tensors}
    if kinds <= {Q.F32}:
        return "float32"
    if kinds <= {Q.F32, Q.F16}:
        return "float16"
    if kinds <= {Q.F32, Q.BF16}:
        return "bfloat16"
    return QUANTIZED_DTYPE


def _sha256(gguf: Path) -> str:
    for entry in zoo.ZOO.values():  # a zoo file was checked against its known digest when fetched
        if zoo.model_path(entry) == gguf and zoo.is_fetched(entry):
            return entry.sha256
    digest = hashlib.sha256()
    with open(gguf, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def folder_for(gguf: Path, digest: str | None = None) -> Path:
    """Where `gguf`'s dequantized checkpoint lives: beside it, or (a folder that cannot be written) in the
    user cache under its sha256."""
    if os.access(gguf.parent, os.W_OK):
        return gguf.parent / f".{gguf.name}.dequantized"
    return zoo.cache_dir() / "dequantized" / (digest or _sha256(gguf))[:32]


def _record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _complete(folder: Path) -> bool:
    """Whether the folder holds a whole checkpoint: config, tokenizer, every shard as long as its header says."""
    from .checkpoint import Checkpoint

    if not (folder / "tokenizer_config.json").is_file():
        return False
    try:
        Checkpoint(folder)
    except UserError:
        return False
    return True


def _stamp(gguf: Path) -> dict:
    info = gguf.stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def checkpoint_for(gguf: str | Path) -> Path:
    """The dequantized checkpoint folder of `gguf`, built on first use (see the module docstring)."""
    gguf = Path(gguf).resolve()
    stamp = _stamp(gguf)
    digest = None
    if not os.access(gguf.parent, os.W_OK):  # the cache folder is named by the digest
        digest = _sha256(gguf)
    folder = folder_for(gguf, digest)
    record = _record(folder)
    if record and {k: record.get(k) for k in stamp} == stamp and _complete(folder):
        return folder  # the same file as when it was built: no hashing
    digest = digest or _sha256(gguf)
    if record and record.get("sha256") == digest and _complete(folder):
        _write_record(folder, {**record, **stamp})  # touched, same bytes
        return folder
    if folder.exists():
        why = "is incomplete or damaged" if record and record.get("sha256") == digest else \
            "was made from another file" if record else "has no record of its GGUF"
        log.warning("the dequantized copy %s %s: rebuilding it", folder, why)
    build(gguf, folder, digest, stamp)
    return folder


def _write_record(folder: Path, record: dict) -> None:
    from .._io import atomic_write_text

    atomic_write_text(folder / RECORD, json.dumps(record, indent=2, sort_keys=True))


def build(gguf: Path, folder: Path, digest: str, stamp: dict) -> None:
    """Dequantize `gguf` with transformers' GGUF loader into `folder` (atomically, replacing what is there)."""
    from .._io import staging_dir

    dtype = release_dtype(gguf)
    log.info("dequantizing %s once, in %s, into %s", gguf.name, dtype, folder)
    with staging_dir(folder, overwrite=True) as work:
        dequantize(gguf, work, dtype)
        (work / RECORD).write_text(json.dumps({"format": FORMAT, "gguf": str(gguf), "sha256": digest, "dtype": dtype,
                                               **stamp}, indent=2, sort_keys=True))


def dequantize(gguf: Path, out: Path, dtype: str) -> None:
    """transformers' GGUF loader, then `save_pretrained` of the model and its tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import gguf_progress_follows_transformers

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with gguf_progress_follows_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        from ..errors import first_line

        raise UserError(f"cannot load GGUF '{gguf}': {first_line(exc, 300)} (check the file or fetch it again)")
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: save them as they are
        del config.quantization_config
    model.hf_quantizer = None
    from .loading import complete_generation_eos

    complete_generation_eos(model, tokenizer)  # the GGUF's rebuilt config names one EOS; llama.cpp stops at all
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
