"""The patch converter: a bias export's offsets added to the target's own GGUF (export.gguf.patch_gguf)."""

from __future__ import annotations

from pathlib import Path

from . import Converter


def _write(folded, out: Path, *, overwrite: bool = False, base: str | None = None) -> dict:
    from ..gguf import patch_gguf

    return patch_gguf(folded, out, base=base, overwrite=overwrite)


def _describe(info: dict, out: Path) -> str:
    extra = f", relabelled {info['relabelled_from']} -> {info['architecture']}" if info["relabelled_from"] else ""
    return (f"wrote {out} (patched {info['base']}: {len(info['biases_added'])} biases added, "
            f"{len(info['biases_replaced'])} replaced{extra})")


CONVERTER = Converter("patch", "the offsets added to the target's GGUF, its quantization kept byte for byte",
                      "fold", ("base",), _write, _describe)
