"""Atomic writes and checked reads of the safetensors files the pipeline passes between stages."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | Path, kind: str, format_tag: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata, checking the file is the expected kind of artifact."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind} file '{path}' not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{kind} file '{path}' is not a readable safetensors file ({exc}); write it again")
    if metadata.get("format") != format_tag:
        raise UserError(
            f"'{path}' is not a {kind} file (format '{metadata.get('format', 'missing')}', expected '{format_tag}')"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{kind} file '{path}': tensor '{name}' contains NaN or inf; recompute it")
    return tensors, metadata


def json_meta(value) -> str:
    return json.dumps(value, sort_keys=True)
