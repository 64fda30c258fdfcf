"""The control-vector converter: steering vectors as a llama.cpp control vector (direction.N, added to
the output of layer N at every position; export.gguf.write_control_vector_gguf)."""

from __future__ import annotations

from pathlib import Path

from . import Converter


def _write(vectors, out: Path, *, overwrite: bool = False, scale: float = 1.0, model_hint: str | None = None) -> dict:
    from ..gguf import write_control_vector_gguf

    return write_control_vector_gguf(vectors, out, scale=scale, model_hint=model_hint, overwrite=overwrite)


def _describe(info: dict, out: Path) -> str:
    layers = info["layers"]
    return (f"wrote {out} (control vector for {info['model_hint']}, layers {layers[0]}-{layers[-1]} "
            f"({len(layers)}), scale {info['scale']:g})")


CONVERTER = Converter("control-vector", "steering vectors as a llama.cpp control vector (--control-vector)",
                      "vectors", ("scale", "model_hint"), _write, _describe)
