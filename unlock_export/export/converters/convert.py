"""The convert converter: a bias export through llama.cpp's convert_hf_to_gguf.py (export.gguf.convert_gguf)."""

from __future__ import annotations

from pathlib import Path

from . import Converter


def _write(folded, out: Path, *, overwrite: bool = False, llama_cpp: str | Path | None = None,
           outtype: str = "f32") -> dict:
    from ..gguf import convert_gguf

    return convert_gguf(folded, out, llama_cpp=llama_cpp, outtype=outtype, overwrite=overwrite)


def _describe(info: dict, out: Path) -> str:
    return f"wrote {out} (converted with {info['llama_cpp']}, {info['outtype']})"


CONVERTER = Converter("convert", "llama.cpp's convert_hf_to_gguf.py on the folded checkpoint",
                      "fold", ("llama_cpp", "outtype"), _write, _describe)
