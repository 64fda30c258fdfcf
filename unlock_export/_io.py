"""Atomic writes (files, text, safetensors) and checked reads of the safetensors files the pipeline
passes between stages: the one place for atomicity."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path beside `path`; it is renamed onto `path` only when the block succeeds,
    and removed when it fails or is interrupted. The file gets the permissions a plain `open` would
    give it (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staging_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure (an
    exception, Ctrl-C) it is removed and `out` is left as it was. The folder gets the permissions a
    plain `mkdir` would give it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(work, 0o777 & ~_umask())
    try:
        yield work
        if out.exists():
            if not overwrite:
                raise UserError(f"output '{out}' appeared while writing: choose another folder or pass --overwrite")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(work, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file to a temporary name beside `path`, then rename it into place."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def read_safetensors(path: str | Path, kind: str, format_tag: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata, checking the file is the expected kind of artifact."""
    import torch
    from safetensors import SafetensorError, safe_open

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


@contextmanager
def progress_folder(output: str | Path, resume: bool, start_over: bool):
    """A folder beside `output` (`.NAME.partial`) where long steps keep their progress.

    It is removed when the block finishes; kept, with a hint to resume, when the block is
    interrupted or fails after saving something. Found from an earlier run, it is used only with
    `resume` and removed with `start_over`; otherwise the caller is told to choose."""
    output = Path(output)
    folder = output.parent / f".{output.name}.partial"
    if folder.exists() and not resume:
        if not start_over:
            raise UserError(f"an interrupted run left its progress in '{folder}': pass --resume to continue it, "
                            "or --overwrite to start over")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if any(folder.iterdir()):
            logging.getLogger("unlock_export").warning(
                "progress kept in %s: rerun the same command with --resume to continue", folder)
        else:
            folder.rmdir()
        raise
    shutil.rmtree(folder, ignore_errors=True)
